"""Import a folder-per-class tree of photos into the competition layout (`flower import`).

    flower import photos/ data/mine --sizes 192,224

    <src>/<class>/<any>.jpg|png|...  ->  <out>/tfrecords-jpeg-<S>x<S>/{train,val,test}/*.tfrec
                                         <out>/classes.json, <out>/test_answers.csv, <out>/import_report.json

The split is stratified by class and seeded. Duplicates stay together: files with the same bytes, and
near duplicates (the same photo resized, recompressed, slightly edited or cropped: perceptual hashes at most
--near-duplicate-distance bits apart of 64, 'off' for exact copies only) form a group, and each group goes
whole to one split, so a photo in val or test never has a copy in train. The hash is taken of what is
stored: the square (per --fit) at the largest size, as the JPEG written, so a wide photo and its square crop,
or two wide shots with the same middle, are one group. A flat or noise-free smooth image (one colour, a clean
gradient) has a hash with few bits set that says nothing; it is grouped by its bytes only and listed as such.
Per-class counts stay as close to the fractions as the groups allow (exact when there are no duplicates); a
class whose val or test falls short of its target, or that is too small to get any val or test photo, is
warned about, and an import that would leave val or test empty is refused before anything is written. A
group whose files sit in different class folders is a label conflict: it is imported (into train, so it is
never scored) and reported as a warning; fix the labels in the source folders and import again (an import
whose val or test only label conflicts could fill is refused). Groups and warnings are in
`import_report.json` and on screen.

Test records carry no label; their labels go to `test_answers.csv` (`id,label`) so a submission can be
scored. Files that are not readable images are listed in the report and on screen, never dropped silently:
so are images whose header declares more than --max-pixels pixels (decompression bombs; never decoded),
broken links, link loops and pipes or devices. Links are followed; a file reached twice through links is
imported once, and not at all when it is reached from two class folders (its label is ambiguous). A class
folder that is a link to the source folder or above it, or two class folders that are one folder, are
refused. A file name that is not valid UTF-8 is imported, shown with its odd bytes escaped (`bad\\xff.jpg`).
A class is named by its folder, and every part shows and compares class names without surrounding spaces:
a folder whose name is only spaces, or two whose names are equal once stripped (`rose` and `rose `), are
refused before anything is written.

OUT is one data set: its size folders, classes.json, test_answers.csv and import_report.json. An import into
a folder that holds one is refused unless --overwrite is given, which replaces all of them as one unit (size
folders the import does not write are removed; other files in OUT are kept). Everything is written into a
staging folder inside OUT first; only when it is complete is the old data set moved aside and the new one
moved in, and the old one is deleted last. A failed import leaves the earlier data untouched; one killed
half-way is finished or undone by the next import into the same folder, before it does anything else.
"""
