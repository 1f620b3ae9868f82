"""Pick the distribution strategy (multi-worker, TPU, GPUs, logical CPU replicas, default) and the precision.

The strategy is created before anything lists devices or runs an op: a multi-worker strategy must
configure the runtime's collectives itself, and logical CPU devices can only be set up before the
runtime starts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import keras
import tensorflow as tf

CPU_REPLICAS_ENV = "FLOWER_CPU_REPLICAS"


def cpu_replicas_requested() -> int:
    """How many logical CPU replicas FLOWER_CPU_REPLICAS asks for (0 or 1: none); a bad value is named."""
    text = os.environ.get(CPU_REPLICAS_ENV, "").strip()
    if not text:
        return 0
    if not text.isdigit() or not 0 < int(text) <= 64:
        raise ValueError(f"{CPU_REPLICAS_ENV} must be a whole number from 1 to 64, got {text!r}")
    return int(text)


def _cluster_size() -> int:
    """The number of tasks TF_CONFIG names (0 without TF_CONFIG); malformed TF_CONFIG is named."""
    text = os.environ.get("TF_CONFIG", "").strip()
    if not text:
        return 0
    try:
        cluster = json.loads(text).get("cluster", {})
    except (json.JSONDecodeError, AttributeError):
        raise ValueError(f"TF_CONFIG is not a JSON object with a 'cluster': {text[:200]!r}") from None
    return sum(len(tasks) for tasks in cluster.values())


def this_task() -> tuple[bool, str]:
    """(whether this process is the chief, its name): the chief is task 'chief', else worker 0 (TF_CONFIG)."""
    text = os.environ.get("TF_CONFIG", "").strip()
    if _cluster_size() <= 1:
        return True, "chief"
    document = json.loads(text)
    task = document.get("task", {})
    kind, index = task.get("type"), task.get("index")
    if kind not in ("chief", "worker") or not isinstance(index, int):
        raise ValueError(f"TF_CONFIG 'task' must name type 'chief' or 'worker' and an integer index, got {task!r}")
    has_chief = bool(document["cluster"].get("chief"))
    return kind == "chief" or (kind == "worker" and index == 0 and not has_chief), f"{kind} {index}"


def worker_index() -> int:
    """This process's place among the workers (0 for the chief; TF_CONFIG's order: chief, then workers)."""
    if _cluster_size() <= 1:
        return 0
    document = json.loads(os.environ["TF_CONFIG"])
    kind, index = this_task()[1].split()
    if kind == "chief":
        return 0
    return int(index) + (1 if document["cluster"].get("chief") else 0)


def any_worker(strategy: tf.distribute.Strategy, flag: bool) -> bool:
    """True if `flag` is true on any worker (a collective: every worker must call it at the same point)."""
    if worker_count() <= 1:
        return flag

    @tf.autograph.experimental.do_not_convert
    def vote() -> tf.Tensor:
        return tf.constant(1.0 if flag else 0.0)

    @tf.function(autograph=False)
    def count() -> tf.Tensor:
        return strategy.reduce("SUM", strategy.run(vote), axis=None)

    return bool(count().numpy() > 0)


def worker_count() -> int:
    """How many machines (processes) train together: the tasks TF_CONFIG names, or 1."""
    return max(_cluster_size(), 1)


def shard_policy(setting: str, workers: int, files: int, log: Callable[[str], None] = print) -> str:
    """How the training data is split among workers (data.shard): 'off' for one worker, else 'file' or 'data'.

    'auto' shards by file when every worker gets at least one record file, and otherwise falls back to
    sharding by data (every worker reads every file and keeps its share: correct, but N times the reading).
    """
    if workers <= 1:
        return "off"
    if setting == "file" and files < workers:
        raise ValueError(f"data.shard=file needs at least one record file per worker: {files} file(s) for "
                         f"{workers} workers (use data.shard=data or auto, or write the records in more files)")
    if setting == "auto":
        setting = "file" if files >= workers else "data"
        if setting == "data":
            log(f"warning: {files} training record file(s) for {workers} workers, too few to give each worker "
                "its own files: sharding by data instead (every worker reads all files)")
    log(f"data sharding: by {setting} over {workers} workers ({files} training record files)")
    return setting


def cpu_replica_strategy(replicas: int) -> tf.distribute.Strategy:
    """MirroredStrategy over `replicas` logical CPU devices split from the first CPU (a test and debug aid)."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
    except RuntimeError:
        raise RuntimeError(f"{CPU_REPLICAS_ENV}={replicas} must be set before TensorFlow starts its runtime "
                           "(in a fresh process)") from None
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices, cross_device_ops=tf.distribute.ReductionToOneDevice())


def _tpu_strategy() -> tf.distribute.Strategy | None:
    """TPUStrategy when a TPU is reachable (Kaggle and Colab conventions), else None."""
    try:
        # Kaggle and Colab TPU VMs: no address needed; TPU_NAME / COLAB_TPU_ADDR are read by the resolver.
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=os.environ.get("TPU_NAME", ""))
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    except (ValueError, RuntimeError, tf.errors.NotFoundError, tf.errors.UnavailableError, KeyError):
        return None


def _mend_keras_multi_worker_logs() -> None:
    """Let Keras 3 `fit` run under a multi-worker strategy: reduce a step's scalar logs whole.

    Keras 3 reduces every value a training step returns with `strategy.reduce("MEAN", v, axis=0)` when
    the strategy spans several workers, which fails for the scalar loss and metrics ("Invalid
    reduction dimension 0 for input with 0 dimensions", tensorflow/tensorflow#72388). Scalars are
    reduced with axis=None instead; everything else goes to Keras unchanged. A no-op once Keras
    changes the function this wraps.
    """
    try:
        from keras.src.backend.tensorflow import trainer as keras_trainer
    except ImportError:
        return
    original = getattr(keras_trainer, "reduce_per_replica", None)
    multi_worker = getattr(keras_trainer, "_collective_all_reduce_multi_worker", None)
    if original is None or multi_worker is None or getattr(original, "mended", False):
        return

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and multi_worker(strategy):
            def whole(value):
                if value is None or not hasattr(value, "shape") or value.shape.rank != 0:
                    return original(value, strategy, reduction)
                return strategy.reduce("MEAN", value, axis=None)
            return tf.nest.map_structure(whole, values)
        return original(values, strategy, reduction)

    reduce_per_replica.mended = True
    keras_trainer.reduce_per_replica = reduce_per_replica


def detect_strategy(log: Callable[[str], None] = print) -> tuple[tf.distribute.Strategy, str]:
    """Multi-worker (TF_CONFIG), logical CPU replicas (FLOWER_CPU_REPLICAS), TPU, GPUs, or the default."""
    replicas = cpu_replicas_requested()
    if _cluster_size() > 1:
        strategy, kind = tf.distribute.MultiWorkerMirroredStrategy(), "multi-worker"
        _mend_keras_multi_worker_logs()
    elif replicas > 1:
        strategy, kind = cpu_replica_strategy(replicas), "cpu"
    else:
        strategy, kind = _tpu_strategy(), "tpu"
        if strategy is None:
            gpus = tf.config.list_logical_devices("GPU")
            strategy, kind = (tf.distribute.MirroredStrategy(), "gpu") if gpus else (tf.distribute.get_strategy(),
                                                                                      "cpu")
    log(f"strategy: {type(strategy).__name__} ({kind}), {strategy.num_replicas_in_sync} replica(s)")
    return strategy, kind


def gpu_capabilities() -> list[tuple[int, int]]:
    """The CUDA compute capability of each visible GPU ((0, 0) where the driver does not say)."""
    found = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        found.append(tuple(details.get("compute_capability") or (0, 0)))
    return found


def auto_precision(device: str, capabilities: list[tuple[int, int]]) -> tuple[str, str]:
    """The policy train.mixed_precision='auto' picks on a device (tpu | gpu | cpu), and why: bfloat16 on
    TPUs and on GPUs of compute capability 8.0 and up, float16 (with loss scaling) on older GPUs, float32 on CPUs."""
    if device == "tpu":
        return "mixed_bfloat16", "TPU"
    if device == "gpu" and capabilities:
        major, minor = min(capabilities)
        if (major, minor) >= (8, 0):
            return "mixed_bfloat16", f"GPU compute capability {major}.{minor} >= 8.0"
        return "mixed_float16", f"GPU compute capability {major}.{minor} < 8.0: float16 with loss scaling"
    return "float32", "CPU"


def set_precision(setting: str, kind: str, log: Callable[[str], None] = print,
                  capabilities: list[tuple[int, int]] | None = None) -> str:
    """Apply the mixed-precision policy (train.mixed_precision): auto by device, or as asked; never on CPU.

    `kind` is detect_strategy's; `capabilities` (the GPUs' compute capabilities) are looked up when not given.
    """
    if capabilities is None:
        capabilities = gpu_capabilities() if kind in ("gpu", "multi-worker") else []
    device = "tpu" if kind == "tpu" else "gpu" if capabilities else "cpu"
    if setting == "auto":
        policy, why = auto_precision(device, capabilities)
    elif setting == "off":
        policy, why = "float32", "asked"
    elif device == "cpu":
        policy, why = "float32", "CPU"
        log(f"mixed precision {setting!r} ignored on CPU (slower there)")
    else:
        policy, why = f"mixed_{setting}", "asked"
    keras.mixed_precision.set_global_policy(policy)
    log(f"precision policy: {policy} ({why})")
    return policy
