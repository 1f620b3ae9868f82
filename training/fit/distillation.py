"""The loss of a distilled student (Hinton, Vinyals and Dean 2015, "Distilling the Knowledge in a Neural Network").

The targets are rows [soft | hard] of 2C numbers (training.data.soft_targets): the teacher's probabilities at
temperature T, and weighted (pseudo-)labels. The student's softmax output q is turned back into its logits up to
a constant (log q), so its probabilities at the temperature are softmax(log q / T). Per example:

    T^2 * KL(soft || softmax(log q / T))  +  sum_c hard_c * -log q_c

The T^2 keeps the soft part's gradients at the scale of the hard part's whatever T is (their size goes as 1/T^2).
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

TINY = 1e-30  # a float32 softmax output may be exactly 0 for a class far below the others: log(0) is -inf


def distillation_loss(temperature: float) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """The per-example loss for targets [soft | hard] and the student's probabilities (one value per example, as
    training.fit.loop.make_loss's, so Keras averages over the global batch)."""
    t = float(temperature)

    def loss(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        classes = y_pred.shape[-1]
        soft, hard = y_true[:, :classes], y_true[:, classes:]
        log_q = tf.math.log(tf.maximum(tf.cast(y_pred, tf.float32), TINY))
        log_q_t = tf.nn.log_softmax(log_q / t, axis=-1)
        kl = tf.reduce_sum(soft * (tf.math.log(tf.maximum(soft, TINY)) - log_q_t), axis=-1)
        return t * t * kl - tf.reduce_sum(hard * log_q, axis=-1)

    return loss
