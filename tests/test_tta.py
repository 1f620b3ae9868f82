"""Test-time augmentation and predict_split: really augmented passes, reproducible, padded batches, each
image once in id order, damaged answers refused, rows normalised and unlabelled splits read."""

from __future__ import annotations

import numpy as np
import pytest

from training.fit.export import TTA_AUGMENT, predict_split


class RecordingModel:
    """Stands in for a Keras model: records the batches it is asked to predict."""

    def __init__(self):
        self.batches = []

    def predict(self, dataset, verbose=0):
        outputs = []
        for images in dataset.as_numpy_iterator():
            self.batches.append(images)
            # A deliberately non-symmetric score, so flipped inputs change the output.
            score = images[:, :, : images.shape[2] // 2].mean(axis=(1, 2, 3))
            outputs.append(np.stack([score, 255.0 - score], axis=1) / 255.0)
        return np.concatenate(outputs)


def test_tta_feeds_really_augmented_images_and_changes_predictions(tiny_data):
    from training.data.dataset import split_info

    info = split_info(str(tiny_data), "val", 32)
    plain, tta = RecordingModel(), RecordingModel()
    _, _, p1 = predict_split(plain, info, 32, 24, tta=1)
    _, _, p3 = predict_split(tta, info, 32, 24, tta=3)
    assert len(tta.batches) == 3 * len(plain.batches)
    passes = len(plain.batches)
    original, first_aug, second_aug = tta.batches[0], tta.batches[passes], tta.batches[2 * passes]
    assert np.abs(first_aug - original).mean() > 1.0 and np.abs(second_aug - first_aug).mean() > 1.0
    assert np.abs(p3 - p1).max() > 1e-3
    assert TTA_AUGMENT.erase_prob == 0 and not TTA_AUGMENT.mixes_batches


def test_tta_is_reproducible(tiny_data):
    from training.data.dataset import split_info

    info = split_info(str(tiny_data), "val", 32)
    a = predict_split(RecordingModel(), info, 32, 24, tta=3)[2]
    b = predict_split(RecordingModel(), info, 32, 24, tta=3)[2]
    np.testing.assert_array_equal(a, b)


class BrokenModel(RecordingModel):
    """A RecordingModel whose answer is damaged: NaN in one row, or one row too few."""

    def __init__(self, damage: str):
        super().__init__()
        self.damage = damage

    def predict(self, dataset, verbose=0):
        probs = super().predict(dataset, verbose)
        if self.damage == "nan":
            probs[1, 0] = np.nan
            return probs
        return probs[:-1]


def test_predict_split_pads_every_batch_and_returns_each_image_once_in_id_order(tiny_data):
    import tensorflow as tf

    from imaging.records import decode_jpeg, iter_records
    from training.data.dataset import split_info

    info = split_info(str(tiny_data), "val", 32)
    model = RecordingModel()
    ids, labels, probs = predict_split(model, info, 32, 7, tta=1)  # batches of 7: the last one is short
    assert labels.dtype == np.int64 and probs.dtype == np.float32
    assert all(batch.shape[0] == 7 for batch in model.batches)  # one shape: padded to the batch size
    assert len(ids) == info.count == len(probs) == len(labels) and list(ids) == sorted(ids)
    assert len(set(ids)) == len(ids)
    # Each row belongs to its own image: the model's score of that image, renormalised.
    by_id = {}
    for path in info.files:
        for _, raw in iter_records(path):
            feature = tf.train.Example.FromString(raw).features.feature
            pixels = decode_jpeg(feature["image"].bytes_list.value[0], 32).numpy().astype(np.float32)
            by_id[feature["id"].bytes_list.value[0].decode()] = pixels[:, :16].mean() / 255.0
    np.testing.assert_allclose(probs[:, 0], [by_id[i] for i in ids], atol=1e-5)


@pytest.mark.parametrize("damage,error,text", [
    ("nan", ValueError, "predictions for split 'val' are not finite .*: nothing is written from them"),
    ("short", RuntimeError, "the model returned {n} predictions for the {m} images of split 'val'")])
def test_predict_split_refuses_a_damaged_answer(tiny_data, damage, error, text):
    from training.data.dataset import split_info

    info = split_info(str(tiny_data), "val", 32)
    padded = -(-info.count // 7) * 7  # every batch is padded to 7 rows
    with pytest.raises(error, match=text.format(n=padded - 1, m=info.count)):
        predict_split(BrokenModel(damage), info, 32, 7, tta=1)


class UnnormalisedModel(RecordingModel):
    """Rows that do not sum to 1 (twice a distribution), as a float16 model's may not."""

    def predict(self, dataset, verbose=0):
        return 2.0 * super().predict(dataset, verbose)


def test_predict_split_defaults_normalises_rows_and_reads_unlabelled_splits(tiny_data):
    from training.data.dataset import split_info

    info = split_info(str(tiny_data), "val", 32)
    model = RecordingModel()
    ids, labels, probs = predict_split(model, info, 32, 7)  # default: one pass
    assert len(model.batches) == -(-info.count // 7) and probs.dtype == np.float32
    np.testing.assert_allclose(predict_split(UnnormalisedModel(), info, 32, 7)[2], probs, atol=1e-6)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    # The TTA passes' default seed is 1.
    np.testing.assert_array_equal(predict_split(RecordingModel(), info, 32, 7, tta=2)[2],
                                  predict_split(RecordingModel(), info, 32, 7, tta=2, seed=1)[2])
    assert np.abs(predict_split(RecordingModel(), info, 32, 7, tta=2, seed=2)[2]
                  - predict_split(RecordingModel(), info, 32, 7, tta=2)[2]).max() > 1e-6
    test = split_info(str(tiny_data), "test", 32)
    test_ids, test_labels, test_probs = predict_split(RecordingModel(), test, 32, 7)
    assert test_labels is None and len(test_ids) == test.count == len(test_probs)
    # With the number of classes given, a label out of range is named, not predicted on.
    with pytest.raises(Exception, match="class label out of range"):
        predict_split(RecordingModel(), info, 32, 7, num_classes=1)


def test_predict_split_with_a_keras_model_prints_no_progress_bar(tiny_data, capfd):
    from training.data.dataset import split_info
    from training.models.model import build_classifier

    info = split_info(str(tiny_data), "val", 32)
    capfd.readouterr()
    ids, _, probs = predict_split(build_classifier("small-cnn", 32, 3), info, 32, 16)
    assert len(ids) == len(probs) == info.count
    assert capfd.readouterr().out == ""  # the command's own progress lines stay readable in a log
