"""Pick the distribution strategy (multi-worker, TPU, GPUs, logical CPU replicas, default) and the precision.

The strategy is created before anything lists devices or runs an op: a multi-worker strategy must
configure the runtime's collectives itself, and logical CPU devices can only be set up before the
runtime starts.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable

import keras
import tensorflow as tf

from core.errors import ConfigError
from training.fit.cluster import wait_for_cluster, worker_count

CPU_REPLICAS_ENV = "FLOWER_CPU_REPLICAS"


def cpu_replicas_requested() -> int:
    """How many logical CPU replicas FLOWER_CPU_REPLICAS asks for (0 or 1: none); a bad value is named."""
    text = os.environ.get(CPU_REPLICAS_ENV, "").strip()
    if not text:
        return 0
    if not text.isdigit() or not 0 < int(text) <= 64:
        raise ConfigError(f"{CPU_REPLICAS_ENV} must be a whole number from 1 to 64, got {text!r}")
    return int(text)


def _over_workers(strategy: tf.distribute.Strategy, reduction: str, value: float) -> float:
    """`value` reduced (SUM or MEAN) over every worker's replicas: a collective, every worker calls it alike."""

    @tf.autograph.experimental.do_not_convert
    def local() -> tf.Tensor:
        return tf.constant(value, tf.float32)

    @tf.function(autograph=False)
    def reduce() -> tf.Tensor:
        return strategy.reduce(reduction, strategy.run(local), axis=None)

    return float(reduce().numpy())


def same_on_every_worker(strategy: tf.distribute.Strategy, value: int) -> bool:
    """Whether a whole number (0 <= value < 2**20) is the same on every worker (a collective, like any_worker)."""
    if worker_count() <= 1:
        return True
    mean = _over_workers(strategy, "MEAN", float(value))
    return _over_workers(strategy, "SUM", (value - mean) ** 2) < 0.1  # whole numbers: a difference gives >= 0.5


def any_worker(strategy: tf.distribute.Strategy, flag: bool) -> bool:
    """True if `flag` is true on any worker (a collective: every worker must call it at the same point)."""
    if worker_count() <= 1:
        return flag
    return _over_workers(strategy, "SUM", 1.0 if flag else 0.0) > 0


def shard_policy(setting: str, workers: int, counts: list[int], log: Callable[[str], None] = print) -> str:
    """How the training data is split among workers (data.shard): 'off' for one worker, else 'file' or 'data'.

    `counts` are the records of each training file, in the pipeline's file order (worker i reads files
    i, i + workers, ...). Every worker takes the same number of images per step, so sharding by file is
    only right when the workers' shares are about equal: 'auto' shards by file when they are within 10%
    of each other, and otherwise falls back to sharding by data (every worker reads every file and
    keeps its share of each batch: the same batches as one process, N times the reading).
    """
    if workers <= 1:
        return "off"
    files = len(counts)
    if setting == "file" and files < workers:
        raise ConfigError(f"data.shard=file needs at least one record file per worker: {files} file(s) for "
                          f"{workers} workers (use data.shard=data or auto, or write the records in more files)")
    shares = [sum(counts[i::workers]) for i in range(workers)] if files >= workers else []
    even = bool(shares) and max(shares) <= 1.1 * min(shares)
    if setting == "auto":
        setting = "file" if even else "data"
        if not shares:
            log(f"warning: {files} training record file(s) for {workers} workers, too few to give each worker "
                "its own files: sharding by data instead (every worker reads all files)")
        elif not even:
            log(f"warning: the workers' shares of the training files would hold {min(shares)} to {max(shares)} "
                "records, and every worker takes the same number per step (images in a small share would be "
                "seen more often): sharding by data instead (every worker reads all files)")
    elif setting == "file" and not even:
        log(f"warning: data.shard=file gives the workers {min(shares)} to {max(shares)} records each; every worker "
            "takes the same number per step, so images in a small share are seen more often")
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
                local = (strategy.experimental_local_results(value)[0]
                         if isinstance(value, tf.distribute.DistributedValues) else value)
                if getattr(getattr(local, "shape", None), "rank", None) != 0:
                    return original(value, strategy, reduction)
                return strategy.reduce("MEAN", value, axis=None)
            return tf.nest.map_structure(whole, values)
        return original(values, strategy, reduction)

    reduce_per_replica.mended = True
    keras_trainer.reduce_per_replica = reduce_per_replica


def multi_worker_strategy(cluster_timeout: float, log: Callable[[str], None] = print) -> tf.distribute.Strategy:
    """MultiWorkerMirroredStrategy, once every task of TF_CONFIG is up (at most `cluster_timeout` seconds).

    TensorFlow's coordination service takes SIGTERM over as the strategy starts (it only notes it, for its
    preemption handling, which this project does not use): the handler the process had is put back, so that
    SIGTERM still stops a worker.
    """
    wait_for_cluster(cluster_timeout, log)
    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGTERM) if main else None
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    if handler is not None:
        signal.signal(signal.SIGTERM, handler)
    _mend_keras_multi_worker_logs()
    return strategy


def detect_strategy(log: Callable[[str], None] = print,
                    cluster_timeout: float = 300.0) -> tuple[tf.distribute.Strategy, str]:
    """Multi-worker (TF_CONFIG; its tasks waited for at most `cluster_timeout` seconds), logical CPU replicas
    (FLOWER_CPU_REPLICAS), TPU, GPUs, or the default."""
    replicas = cpu_replicas_requested()
    if worker_count() > 1:
        strategy, kind = multi_worker_strategy(cluster_timeout, log), "multi-worker"
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
