"""A minimal plain Flower ClientApp: the reference arm of ``benchmarks/sim_vs_flower.py``.

What a researcher would write with Flower alone for the same work as fedcare's scale scenario:
module-level ``train`` / ``evaluate`` functions, the hospital's arrays loaded once per process
from ``<sites-dir>/site-<partition-id>.npz`` (written by the benchmark from fedcare's own
partition, so both arms see the same hospitals), the same GroupNorm CNN
(``fedcare.models.cnn.MedicalCNN``), plain SGD with BCE-with-logits, one local epoch, and an
evaluation reply of loss and accuracy. No policy, ledger, privacy or validation.

It is imported by reference in Ray's workers (flwr passes the driver's ``sys.path`` to them; the
benchmark runs from this folder).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedcare.models.cnn import MedicalCNN

app = ClientApp()


def build_model(width: int = 8) -> nn.Module:
    """Return the benchmark's CNN (1 channel, 28 px, binary: one logit)."""
    return MedicalCNN(in_channels=1, num_classes=2, image_size=28, width=width)


@lru_cache(maxsize=None)
def load_site(path: str) -> dict[str, torch.Tensor]:
    """Load one hospital's arrays (once per process)."""
    with np.load(path) as data:
        return {k: torch.from_numpy(data[k]) for k in data.files}


def _site(msg: Message, context: Context) -> dict[str, torch.Tensor]:
    """Return the arrays of this node's hospital."""
    folder = str(msg.content["config"]["sites-dir"])
    return load_site(f"{folder}/site-{int(context.node_config['partition-id'])}.npz")


def _received(msg: Message, context: Context) -> tuple[ConfigRecord, nn.Module, dict[str, torch.Tensor]]:
    """Return the message's config, the model it carries and this node's hospital."""
    config = msg.content["config"]
    model = build_model(int(config["width"]))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return config, model, _site(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received model for one local epoch."""
    config, model, site = _received(msg, context)
    loader = DataLoader(TensorDataset(site["train_x"], site["train_y"]), batch_size=int(config["batch-size"]),
                        shuffle=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=float(config["lr"]))
    criterion = nn.BCEWithLogitsLoss()
    model.train()
    total, count = 0.0, 0
    for x, y in loader:
        optimizer.zero_grad()
        loss = criterion(model(x).squeeze(-1), y.float())
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(y)
        count += len(y)
    metrics = MetricRecord({"train-loss": total / max(count, 1), "num-examples": count})
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Return the received model's loss and accuracy on the hospital's test split."""
    _, model, site = _received(msg, context)
    x, y = site["test_x"], site["test_y"].float()
    model.eval()
    with torch.no_grad():
        logits = model(x).squeeze(-1) if len(y) else torch.zeros(0)
        loss = float(nn.functional.binary_cross_entropy_with_logits(logits, y)) if len(y) else 0.0
        accuracy = float(((logits > 0).float() == y).float().mean()) if len(y) else 0.0
    metrics = MetricRecord({"loss": loss, "accuracy": accuracy, "num-examples": int(len(y))})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
