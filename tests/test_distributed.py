"""Training split over replicas and workers: losses (focal, class weights, smoothing) per example, one step and a
whole run on 2 and 4 replicas equal one replica, two worker processes (TF_CONFIG) train like one, name a worker lost
midway and resume after the kill, workers with different configs refuse together, a worker waits for the others
at most its timeout and stops at once on a signal, and the replica, precision, sharding and chief settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import keras
import numpy as np
import pytest

from tests.conftest import REPO
from tests.support import KILLED_RUN, TINY_RUN, _weights


def test_focal_loss_discounts_easy_examples_and_class_weights_scale_the_loss():
    from training.config import RunConfig, TrainConfig
    from training.fit.loop import make_loss

    y = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    easy = np.array([[0.95, 0.05], [0.1, 0.9]], np.float32)
    cce = make_loss(RunConfig(train=TrainConfig(loss="cce", label_smoothing=0.0)), None)
    focal = make_loss(RunConfig(train=TrainConfig(loss="focal", focal_gamma=2.0, label_smoothing=0.0)), None)
    assert np.asarray(cce(y, easy)).shape == (2,)  # one value per example: Keras averages and scales per replica
    np.testing.assert_allclose(cce(y, easy), [-np.log(0.95), -np.log(0.9)], rtol=1e-5)
    assert np.all(np.asarray(focal(y, easy)) < 0.1 * np.asarray(cce(y, easy)))
    weighted = make_loss(RunConfig(train=TrainConfig(loss="cce", label_smoothing=0.0)), np.array([3.0, 1.0]))
    np.testing.assert_allclose(weighted(y, easy), [3 * -np.log(0.95), -np.log(0.9)], rtol=1e-5)
    # Label smoothing 0.2 over 2 classes aims at 0.9 / 0.1; focal loss is (1 - p)^gamma times cross-entropy.
    smooth = make_loss(RunConfig(train=TrainConfig(loss="cce", label_smoothing=0.2)), None)
    np.testing.assert_allclose(smooth(y, easy), [-(0.9 * np.log(0.95) + 0.1 * np.log(0.05)),
                                                 -(0.1 * np.log(0.1) + 0.9 * np.log(0.9))], rtol=1e-5)
    gamma_1 = make_loss(RunConfig(train=TrainConfig(loss="focal", focal_gamma=1.0, label_smoothing=0.0)), None)
    focal_values = np.asarray(gamma_1(y, easy))
    assert focal_values.shape == (2,)  # per example, like the cross-entropy
    np.testing.assert_allclose(focal_values, 0.25 * np.array([0.05 * -np.log(0.95), 0.1 * -np.log(0.9)]), rtol=1e-4)
    smooth_focal = make_loss(RunConfig(train=TrainConfig(loss="focal", focal_gamma=1.0, label_smoothing=0.2)), None)
    assert not np.allclose(smooth_focal(y, easy), focal_values)


REPLICA_STEP = textwrap.dedent("""
    # One SGD step of the small CNN's head (backbone frozen: batch norm in inference mode) on one global
    # batch of 16, under FLOWER_CPU_REPLICAS replicas, for each loss option; weights and loss to a file.
    import os, sys, numpy as np
    import keras, tensorflow as tf
    from training.config import RunConfig, TrainConfig
    from training.fit.loop import make_loss
    from training.models.model import build_classifier
    from training.fit.strategy import detect_strategy
    strategy, _ = detect_strategy(lambda _: None)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (16, 16, 16, 3)).astype(np.float32)
    y = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 16)]
    options = {"cce": (TrainConfig(label_smoothing=0.0), None), "smoothing": (TrainConfig(label_smoothing=0.2), None),
               "focal": (TrainConfig(loss="focal", label_smoothing=0.0), None),
               "class_weights": (TrainConfig(label_smoothing=0.0), np.array([0.5, 1.0, 3.0]))}
    out = {"replicas": strategy.num_replicas_in_sync}
    for name, (train, weights) in options.items():
        with strategy.scope():
            keras.utils.set_random_seed(1)
            model = build_classifier("small-cnn", 16, 3, dropout=0.0, trainable="head")
            model.compile(optimizer=keras.optimizers.SGD(0.5), loss=make_loss(RunConfig(train=train), weights))
        before = model.get_layer("probabilities").kernel.numpy()
        history = model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(16), epochs=1, verbose=0)
        out[name + "_loss"] = history.history["loss"][0]
        out[name + "_step"] = model.get_layer("probabilities").kernel.numpy() - before
    np.savez(sys.argv[1], **out)
""")


def test_one_step_on_two_and_four_replicas_equals_one_replica_for_every_loss(tmp_path):
    results = {}
    for replicas in (1, 2, 4):
        path = tmp_path / f"r{replicas}.npz"
        run = subprocess.run([sys.executable, "-c", REPLICA_STEP, str(path)], cwd=REPO, capture_output=True,
                             text=True, timeout=300,
                             env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "FLOWER_CPU_REPLICAS": str(replicas)})
        assert run.returncode == 0, run.stderr[-2000:]
        results[replicas] = dict(np.load(path))
        assert int(results[replicas]["replicas"]) == replicas
    for name in ("cce", "smoothing", "focal", "class_weights"):
        step = results[1][name + "_step"]
        assert np.abs(step).max() > 1e-3  # the step moved the weights
        for replicas in (2, 4):
            np.testing.assert_allclose(results[replicas][name + "_step"], step, rtol=1e-4, atol=1e-6,
                                       err_msg=f"{name} on {replicas} replicas")
            assert float(results[replicas][name + "_loss"]) == pytest.approx(float(results[1][name + "_loss"]),
                                                                             rel=1e-5)


# The whole trainer with the same global batch (16) and learning rate however the work is split: the
# per-replica batch is 16 / N and schedule.max is divided by N (the schedule scales it back up). Batch
# norm frozen and no dropout: those two are per-replica by design. Augmentation with MixUp, focal loss
# and class weights stay on: the pipeline augments the global batch before it is split, so every
# replica gets its own transforms. Several eval batches, uneven among 2 or 4 replicas, short last ones.
EQUIVALENT_RUN = ["--set", "model.batch_norm=frozen", "--set", "model.dropout=0", "--set", "train.loss=focal",
                  "--set", "train.class_weights=true", "--set", "augment.mixup_prob=0.5",
                  "--set", "schedule.kind=constant", "--set", "train.eval_batch_size=7", "--set", "data.shard=data"]


def _split_command(data: Path, out: Path, replicas: int, *extra: str, killed_after: int | None = None) -> list[str]:
    """The train command of EQUIVALENT_RUN for one of `replicas` equal shares of the global batch."""
    overrides = ["--set", f"data.dir={data}", "--set", f"output={out}", *TINY_RUN, *EQUIVALENT_RUN,
                 "--set", f"data.batch_size={16 // replicas}", "--set", f"schedule.max={4e-3 / replicas}", *extra]
    if killed_after is not None:
        return [sys.executable, "-c", KILLED_RUN, str(killed_after), *overrides]
    return [sys.executable, "-m", "flower", "train", *overrides]


@pytest.fixture(scope="module")
def one_replica_run(tiny_data, tmp_path_factory) -> Path:
    """EQUIVALENT_RUN on one replica: what several replicas or workers must reproduce."""
    out = tmp_path_factory.mktemp("one_replica") / "run"
    result = subprocess.run(_split_command(tiny_data, out, 1), cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, result.stderr[-2000:]
    history = _history(out)
    assert abs(history[1][1] - history[0][1]) > 1e-3  # it trained: the loss moved between the epochs
    return out


def _history(run: Path) -> list[list[float]]:
    """Learning rate, loss, val loss, val accuracy and val macro F1 of each epoch."""
    return [[float(v) for v in row.split(",")[1:6]] for row in (run / "history.csv").read_text().splitlines()[1:]]


def _assert_same_training(run: Path, reference: Path, what: str) -> None:
    """The same history, final weights and val/test predictions (with TTA) as the reference run."""
    np.testing.assert_allclose(_history(run), _history(reference), rtol=2e-4, atol=1e-5, err_msg=what)
    weights = _weights(run / "checkpoints" / "epoch-0002" / "weights.weights.h5")
    expected = _weights(reference / "checkpoints" / "epoch-0002" / "weights.weights.h5")
    assert weights.keys() == expected.keys()
    for name in expected:
        if "optimizer" not in name:
            np.testing.assert_allclose(weights[name], expected[name], rtol=1e-3, atol=1e-5, err_msg=f"{name}: {what}")
    for split in ("val", "test"):
        with np.load(run / "predictions" / f"{split}.npz") as a, \
                np.load(reference / "predictions" / f"{split}.npz") as b:
            np.testing.assert_array_equal(a["ids"], b["ids"])
            np.testing.assert_allclose(a["probs"], b["probs"], atol=1e-4, err_msg=f"{split}: {what}")


@pytest.mark.parametrize("replicas", [2, 4])
def test_two_epochs_on_several_replicas_equal_one_replica(tiny_data, one_replica_run, tmp_path, replicas):
    out = tmp_path / "run"
    result = subprocess.run(_split_command(tiny_data, out, replicas), cwd=REPO, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
                                              "FLOWER_CPU_REPLICAS": str(replicas)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{replicas} replica(s)" in result.stdout and "global batch 16," in result.stdout
    _assert_same_training(out, one_replica_run, f"{replicas} replicas")


def _free_ports(count: int) -> list[int]:
    """Ports on 127.0.0.1 that nothing listens on now."""
    import socket

    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def _start_workers(data: Path, out: Path, logs: Path, scratch: Path, killed: int | None = None,
                   extra: tuple[str, ...] = (), ports: list[int] | None = None) -> list:
    """Two worker processes of one multi-worker run (TF_CONFIG on 127.0.0.1, on `ports` or free ones); worker
    `killed` dies after epoch 1; worker 1 gets the `extra` options too."""
    ports = ports or _free_ports(2)
    workers = []
    for index in range(2):
        tf_config = {"cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]},
                     "task": {"type": "worker", "index": index}}
        log = open(logs / f"worker{index}.log", "w")  # noqa: SIM115 (closed when the process is reaped)
        command = _split_command(data, out, 2, *(extra if index == 1 else ()),
                                 killed_after=1 if index == killed else None)
        workers.append((subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={
            **os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "TF_CONFIG": json.dumps(tf_config), "TMPDIR": str(scratch)}),
            log))
    return workers


def _wait(workers: list, timeout: float) -> list[int]:
    """Exit codes of the workers; all are killed if they outlast `timeout` seconds."""
    deadline = time.monotonic() + timeout
    codes = []
    for process, log in workers:
        try:
            codes.append(process.wait(timeout=max(deadline - time.monotonic(), 1)))
        except subprocess.TimeoutExpired:
            for other, _ in workers:
                other.kill()
            codes.append(process.wait())
        log.close()
    return codes


def test_two_worker_processes_train_like_one_and_resume_after_a_kill(tiny_data, one_replica_run, tmp_path):
    # Two MultiWorkerMirroredStrategy workers on 127.0.0.1, one replica each, data sharded by data.
    logs, scratch = tmp_path / "logs", tmp_path / "scratch"
    logs.mkdir()
    scratch.mkdir()
    out = tmp_path / "run"
    codes = _wait(_start_workers(tiny_data, out, logs, scratch), 420)
    assert codes == [0, 0], (logs / "worker0.log").read_text()[-3000:] + (logs / "worker1.log").read_text()[-3000:]
    chief, other = ((logs / f"worker{i}.log").read_text() for i in range(2))
    assert "Strategy (multi-worker), 2 replica(s)" in chief
    assert "data sharding: by data over 2 workers" in chief and "global batch 16," in chief
    assert "worker 1 (not the chief): writes go to" in other and "worker 0 (not the chief)" not in chief
    assert [p for p in scratch.iterdir() if p.name.startswith("flower-")] == []  # the other worker removed its folder
    _assert_same_training(out, one_replica_run, "two workers")
    reference = sorted(p.relative_to(one_replica_run) for p in one_replica_run.rglob("*"))
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == reference  # the chief wrote one run directory

    # Worker 1 is killed right after epoch 1; the chief, at the next collective step, says so in one line (which
    # worker, the last checkpoint, the command that resumes) and stops.
    resumed, ports = tmp_path / "resumed", _free_ports(2)
    workers = _start_workers(tiny_data, resumed, logs, scratch, killed=1, ports=ports)
    assert workers[1][0].wait(timeout=420) == -9
    assert _wait(workers, 90) == [2, -9], (logs / "worker0.log").read_text()[-3000:]
    chief = (logs / "worker0.log").read_text()
    lost = (f"\nerror: worker 1 at 127.0.0.1:{ports[1]} was lost (it stopped, was killed, or cannot be reached), so "
            f"this worker stops too; the last checkpoint is epoch 1 in {resumed / 'checkpoints'}; to resume, start "
            f"every worker again (each with its TF_CONFIG) with: flower train --set data.dir={tiny_data} --set ")
    assert lost in chief and "Traceback" not in chief, chief[-3000:]
    assert (resumed / "checkpoints" / "epoch-0001" / "state.json").exists()
    assert not (resumed / "member.json").exists()
    assert _wait(_start_workers(tiny_data, resumed, logs, scratch), 420) == [0, 0], \
        (logs / "worker0.log").read_text()[-3000:]
    for index in range(2):
        text = (logs / f"worker{index}.log").read_text()
        assert "resuming after epoch 1" in text and "epoch 1/2:" not in text and "epoch 2/2:" in text
    _assert_same_training(resumed, one_replica_run, "two workers, resumed after a kill")
    assert [p for p in scratch.iterdir() if p.name.startswith("flower-")] == []  # cleared what the killed one left


def test_workers_started_with_different_configs_refuse_together(tiny_data, tmp_path):
    logs, scratch = tmp_path / "logs", tmp_path / "scratch"
    logs.mkdir()
    scratch.mkdir()
    workers = _start_workers(tiny_data, tmp_path / "run", logs, scratch, extra=("--set", "train.seed=1"))
    assert _wait(workers, 300) == [2, 2]  # both stop, neither hangs nor trains
    for index in range(2):
        text = (logs / f"worker{index}.log").read_text()
        assert "error: the workers disagree on the config" in text and "epoch 1/2:" not in text
    assert not (tmp_path / "run" / "checkpoints").exists()


def _lone_worker(index: int, tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, Path, str]:
    """Task `index` of a two-worker TF_CONFIG whose other task never starts: the process, its log and the address
    of the missing task."""
    ports = _free_ports(2)
    tf_config = {"cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]}, "task": {"type": "worker",
                                                                                        "index": index}}
    log = tmp_path / f"alone{index}-{ports[0]}.log"
    command = [sys.executable, "-m", "flower", "train", "--set", f"data.dir={tmp_path / 'unread'}",
               "--set", f"output={tmp_path / f'run{ports[0]}'}", *extra]
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env={
            **os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "TF_CONFIG": json.dumps(tf_config), "TMPDIR": str(tmp_path)})
    return process, log, f"{'worker 1' if index == 0 else 'worker 0'} at 127.0.0.1:{ports[1 - index]}"


def test_a_worker_waits_for_the_others_at_most_the_timeout_saying_whom_and_stops_at_once_on_sigterm(tmp_path):
    import signal

    timed_out = _lone_worker(0, tmp_path, "--set", "train.cluster_timeout_seconds=2")
    terminated = _lone_worker(1, tmp_path)
    try:
        process, log, missing = terminated
        deadline = time.monotonic() + 120
        while f"waiting for {missing}" not in log.read_text() and process.poll() is None:
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        start = time.monotonic()
        code = process.wait(timeout=30)
        text = log.read_text()
        # at once: well inside the 300 s it would otherwise wait (15 s leaves room for a machine under load; 5 s
        # was once exceeded by 0.8 s with the two cores at a load average of 10)
        assert code == 143 and time.monotonic() - start < 15, (code, text[-2000:])
        assert text.rstrip().endswith(f"\nstopped while waiting for {missing}") and "Traceback" not in text, text
        process, log, missing = timed_out
        assert process.wait(timeout=120) == 2, log.read_text()[-2000:]
        text = log.read_text()
        assert f"\nwaiting for {missing} (this task: worker 0 at " in text and "Traceback" not in text, text
        assert text.endswith(f"\nerror: {missing} did not come up within 2 s (train.cluster_timeout_seconds; "
                             "worker 1: Connection refused): start every task TF_CONFIG names, check their "
                             "addresses, or give them longer\n"), text
    finally:
        for process, _, _ in (timed_out, terminated):
            if process.poll() is None:
                process.kill()
                process.wait()


def _two_workers(monkeypatch, index: int) -> list[int]:
    """TF_CONFIG of two workers on free loopback ports, this process task `index`; the ports."""
    ports = _free_ports(2)
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                                                "task": {"type": "worker", "index": index}}))
    return ports


def test_ctrl_c_while_waiting_for_the_cluster_names_whom_it_waited_for(monkeypatch):
    from training.fit.cluster import wait_for_cluster

    ports = _two_workers(monkeypatch, 0)
    lines = []

    def interrupted_at_first_line(line: str) -> None:
        lines.append(line)
        if len(lines) == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        wait_for_cluster(60, interrupted_at_first_line)
    assert lines == [f"waiting for worker 1 at 127.0.0.1:{ports[1]} (this task: worker 0 at 127.0.0.1:{ports[0]}; "
                     "giving up after train.cluster_timeout_seconds=60 s)",
                     f"stopped while waiting for worker 1 at 127.0.0.1:{ports[1]}"]


def test_waiting_ends_once_every_other_task_is_up_and_this_tasks_port_answers_meanwhile(monkeypatch):
    import socket
    import threading

    import training.fit.cluster as cluster

    monkeypatch.setattr(cluster, "PROGRESS_SECONDS", 0.1)
    ports = _two_workers(monkeypatch, 1)
    lines = []
    waiting = threading.Thread(target=cluster.wait_for_cluster, args=(30, lines.append, 0.05), daemon=True)
    waiting.start()
    while len(lines) < 2:
        time.sleep(0.05)
    assert lines[1].startswith(f"still waiting for worker 0 at 127.0.0.1:{ports[0]} (")
    assert lines[1].endswith(" of 30 s)")
    with socket.create_connection(("127.0.0.1", ports[1]), timeout=5):  # this task's port is up while it waits
        pass
    with socket.create_server(("127.0.0.1", ports[0])):  # worker 0 comes up
        waiting.join(10)
    assert not waiting.is_alive() and lines[0].startswith(f"waiting for worker 0 at 127.0.0.1:{ports[0]} (this task: ")
    assert lines[-1].startswith("every task of the cluster is up (")
    with socket.create_server(("", ports[1])):  # and its port is free again, for TensorFlow's server
        pass


def test_a_lost_worker_is_named_from_tensorflows_message_and_another_error_is_left_alone(monkeypatch):
    from training.fit.cluster import lost_task

    ports = _two_workers(monkeypatch, 0)
    crashed = ("Collective ops is aborted by: Error reported from /job:worker/task:1: The following tasks are "
               "unhealthy (stopped sending heartbeats):\n/job:worker/replica:0/task:1\nThe tasks have crashed.")
    assert lost_task(crashed) == f"worker 1 at 127.0.0.1:{ports[1]}"
    assert lost_task("failed to connect to all addresses ... from remote target /job:worker/replica:0/task:0") is None
    ports = _two_workers(monkeypatch, 1)  # the chief is lost: worker 1 cannot reach it
    assert lost_task("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Connection refused\n"
                     "Additional GRPC error information from remote target /job:worker/replica:0/task:0 while "
                     "calling /tensorflow.WorkerService/CompleteInstance") == f"worker 0 at 127.0.0.1:{ports[0]}"
    assert lost_task("gs://bucket/train-00.tfrec: Unavailable") is None  # names no task: not a lost worker


def test_a_collective_that_lost_a_worker_becomes_one_error_naming_it_and_other_errors_pass(monkeypatch, tmp_path):
    import tensorflow as tf

    from training.config import RunConfig
    from training.fit.cluster import WorkerLost
    from training.fit.loop import naming_a_lost_worker

    ports = _two_workers(monkeypatch, 0)
    config = RunConfig(output=str(tmp_path / "run"))
    with pytest.raises(WorkerLost) as lost, naming_a_lost_worker(config):
        raise tf.errors.UnavailableError(None, None, "Collective ops is aborted by: ... unhealthy (stopped sending "
                                         "heartbeats):\n/job:worker/replica:0/task:1\nThe tasks have crashed.")
    assert str(lost.value) == (f"worker 1 at 127.0.0.1:{ports[1]} was lost (it stopped, was killed, or cannot be "
                               "reached), so this worker stops too; no epoch was checkpointed yet in "
                               f"{tmp_path / 'run' / 'checkpoints'} (the chief's checkpoints, where the run directory "
                               "is shared)")
    with pytest.raises(tf.errors.UnavailableError), naming_a_lost_worker(config):  # names no task: left alone
        raise tf.errors.UnavailableError(None, None, "gs://bucket/x.tfrec: service unavailable")


def test_sigterm_stops_a_worker_again_once_tensorflows_coordination_service_took_it(monkeypatch):
    import signal

    import tensorflow as tf

    import training.fit.strategy as strategy

    def taking_sigterm():  # what MultiWorkerMirroredStrategy does as its coordination service starts
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return "strategy"

    monkeypatch.setattr(strategy, "wait_for_cluster", lambda timeout, log: None)
    monkeypatch.setattr(strategy, "_mend_keras_multi_worker_logs", lambda: None)
    monkeypatch.setattr(tf.distribute, "MultiWorkerMirroredStrategy", taking_sigterm)
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        assert strategy.multi_worker_strategy(5, print) == "strategy"
        assert signal.getsignal(signal.SIGTERM) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_bad_replica_setting_is_named(monkeypatch):
    from training.fit.strategy import cpu_replicas_requested

    for value in ("two", "-1", "0", "100"):
        monkeypatch.setenv("FLOWER_CPU_REPLICAS", value)
        with pytest.raises(ValueError, match="FLOWER_CPU_REPLICAS must be a whole number from 1 to 64"):
            cpu_replicas_requested()
    monkeypatch.setenv("FLOWER_CPU_REPLICAS", "3")
    assert cpu_replicas_requested() == 3


def test_mixed_precision_auto_follows_the_device_and_is_logged():
    from training.fit.strategy import set_precision

    cases = [("auto", "tpu", [], "mixed_bfloat16"), ("auto", "gpu", [(8, 0)], "mixed_bfloat16"),
             ("auto", "gpu", [(9, 0), (7, 5)], "mixed_float16"),  # the oldest GPU decides
             ("auto", "multi-worker", [(8, 6)], "mixed_bfloat16"), ("auto", "cpu", [], "float32"),
             ("auto", "multi-worker", [], "float32"), ("float16", "gpu", [(8, 0)], "mixed_float16"),
             ("bfloat16", "cpu", [], "float32"), ("off", "tpu", [], "float32")]
    try:
        for setting, kind, capabilities, expected in cases:
            lines = []
            assert set_precision(setting, kind, lines.append, capabilities) == expected, (setting, kind, capabilities)
            assert keras.mixed_precision.global_policy().name == expected
            assert lines[-1].startswith(f"precision policy: {expected} (")
        lines = []
        set_precision("auto", "gpu", lines.append, [(7, 0)])
        assert "compute capability 7.0 < 8.0: float16 with loss scaling" in lines[-1]
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_data_sharding_among_workers_is_by_file_when_the_shares_are_even_else_by_data_with_a_warning():
    from training.fit.strategy import shard_policy

    lines = []
    assert shard_policy("auto", 1, [20], lines.append) == "off" and lines == []  # one worker: nothing to split
    assert shard_policy("auto", 2, [20, 20, 20, 19], lines.append) == "file" and "warning" not in " ".join(lines)
    assert lines[-1] == "data sharding: by file over 2 workers (4 training record files)"
    lines.clear()
    assert shard_policy("auto", 4, [20, 20, 20], lines.append) == "data"
    assert lines[0].startswith("warning: 3 training record file(s) for 4 workers, too few")
    lines.clear()
    assert shard_policy("auto", 2, [20, 20, 20], lines.append) == "data"  # 40 records for one worker, 20 for the other
    assert lines[0].startswith("warning: the workers' shares of the training files would hold 20 to 40 records")
    lines.clear()
    assert shard_policy("file", 2, [20, 20, 20], lines.append) == "file"
    assert lines[0].startswith("warning: data.shard=file gives the workers 20 to 40 records each")
    assert shard_policy("data", 2, [8] * 8, lines.append) == "data"
    with pytest.raises(ValueError, match="data.shard=file needs at least one record file per worker: 1 file"):
        shard_policy("file", 2, [20], lines.append)


def test_the_chief_is_named_by_tf_config(monkeypatch):
    from training.fit.cluster import this_task, worker_count, worker_index

    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert this_task() == (True, "chief") and worker_count() == 1
    cluster = {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}
    for task, expected in [({"type": "worker", "index": 0}, True), ({"type": "worker", "index": 1}, False)]:
        monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": task}))
        assert this_task()[0] is expected and worker_count() == 2 and worker_index() == task["index"]
    with_chief = {**cluster, "chief": ["127.0.0.1:3"], "evaluator": ["127.0.0.1:4"], "ps": ["127.0.0.1:5"]}
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": with_chief, "task": {"type": "worker", "index": 0}}))
    assert this_task() == (False, "worker 0") and worker_count() == 3 and worker_index() == 1  # evaluator, ps: no
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": with_chief, "task": {"type": "chief", "index": 0}}))
    assert this_task() == (True, "chief 0") and worker_index() == 0
    for task in ({"type": "ps", "index": 0}, {"type": "worker", "index": 2}, {"type": "worker", "index": True},
                 {"type": "worker", "index": -1}, {"type": "worker"}, "worker"):
        monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": task}))
        with pytest.raises(ValueError, match="TF_CONFIG 'task' must name type 'chief' or 'worker' and an index"):
            this_task()
    for bad in ('{"cluster": ["127.0.0.1:1"]}', '{"cluster": {"worker": "127.0.0.1:1"}}', "not json", "[]"):
        monkeypatch.setenv("TF_CONFIG", bad)
        with pytest.raises(ValueError, match='TF_CONFIG must be a JSON object whose "cluster" maps task types'):
            worker_count()
    for address in ("nohost", "host:", ":8000", "host:port", "host:0", "host:70000"):  # TensorFlow's own traceback
        monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["127.0.0.1:1", address]},
                                                    "task": {"type": "worker", "index": 0}}))
        with pytest.raises(ValueError, match=f"TF_CONFIG cluster 'worker' lists '{address}': each task is"):
            worker_count()
