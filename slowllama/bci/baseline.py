"""The nearest-centroid baseline: a test trial gets the sentence whose mean training signal is closest
(Euclidean, over the per-channel z-scored samples). No learning beyond averaging, no tolerance to
timing: if the decoder does no better than this, the language model adds nothing."""
import numpy as np

from .data import channel_stats


def nearest_centroid(data, indices):
    """-> the predicted sentence of each trial in `indices` (the train split's sentences only)."""
    train = data.indices('train')
    mean, std = (t.numpy()[:, None] for t in channel_stats(data.signals, train))
    sentences = sorted({data.texts[i] for i in train})
    sums = {s: 0.0 for s in sentences}
    counts = {s: 0 for s in sentences}
    for i in train:
        sums[data.texts[i]] = sums[data.texts[i]] + (data.signals[i] - mean) / std
        counts[data.texts[i]] += 1
    centroids = np.stack([sums[s] / counts[s] for s in sentences]).reshape(len(sentences), -1)  # [S, C*T]
    predictions = []
    for i in indices:
        trial = ((data.signals[i] - mean) / std).reshape(1, -1)
        predictions.append(sentences[int(np.argmin(((centroids - trial) ** 2).sum(axis=1)))])
    return predictions
