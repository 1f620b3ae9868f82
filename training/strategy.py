"""Pick the distribution strategy (TPU, GPUs, multi-worker, default) and the mixed-precision policy."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import keras
import tensorflow as tf


def detect_strategy(log: Callable[[str], None] = print) -> tuple[tf.distribute.Strategy, str]:
    """TPU when reachable (Kaggle/Colab conventions), else multi-worker (TF_CONFIG), GPUs, or default."""
    try:
        # Kaggle and Colab TPU VMs: no address needed; TPU_NAME / COLAB_TPU_ADDR are read by the resolver.
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=os.environ.get("TPU_NAME", ""))
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        strategy, kind = tf.distribute.TPUStrategy(resolver), "tpu"
    except (ValueError, RuntimeError, tf.errors.NotFoundError, tf.errors.UnavailableError, KeyError):
        cluster = json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
        gpus = tf.config.list_logical_devices("GPU")
        if sum(len(v) for v in cluster.values()) > 1:
            strategy, kind = tf.distribute.MultiWorkerMirroredStrategy(), "multi-worker"
        elif gpus:
            strategy, kind = tf.distribute.MirroredStrategy(), "gpu"
        else:
            strategy, kind = tf.distribute.get_strategy(), "cpu"
    log(f"strategy: {type(strategy).__name__} ({kind}), {strategy.num_replicas_in_sync} replica(s)")
    return strategy, kind


def set_precision(setting: str, kind: str, log: Callable[[str], None] = print) -> str:
    """Apply the mixed-precision policy: bfloat16 on TPU for 'auto', float16 on GPU only when asked, never on CPU."""
    if setting == "auto":
        policy = "mixed_bfloat16" if kind == "tpu" else "float32"
    elif setting == "off" or kind == "cpu":
        policy = "float32"
        if setting != "off":
            log(f"mixed precision {setting!r} ignored on CPU (slower there)")
    else:
        policy = f"mixed_{setting}"
    keras.mixed_precision.set_global_policy(policy)
    log(f"precision policy: {policy}")
    return policy
