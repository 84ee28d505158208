"""How much slower is a DP-SGD step than a plain one, per model family and Opacus path?

For each family (CNN on 1x28x28 images, 2 classes; ClinicalLSTM on 48 steps x 36 features +
mask; logistic regression on 13 features; linear regression on 10 features; ``text_bag`` and
``text_lstm`` on 256 hashed tokens of 4096 buckets, embedding 64, 5 classes) and batch size,
this times one training step -- ``zero_grad`` + forward + backward + ``optimizer.step()``,
including Opacus's clipping, noise and accountant step -- for the non-private model and for
every DP path, interleaved round by round so that load from other processes on the machine
hits all variants alike. It reports median step times, the DP/non-DP ratio, the peak memory
of one step, and checks that every DP path clips correctly.

DP paths
    ``hooks``, ``ghost`` (fast gradient clipping, with Opacus's criterion wrapper),
    ``functorch`` and ``ew`` (expanded weights) are Opacus 1.6's ``grad_sample_mode``s;
    ``fast`` is ``fedcare.privacy.fast_grad.make_private_fast`` (regression and LSTM only).
Product path (``--product``)
    ``auto``: the step the product takes, built by ``fedcare.privacy.engine.make_private`` with
    ``grad_sample_mode="auto"`` (what ``client.training.train_local`` calls; an RDP accountant
    stands in for the ledger's), empty Poisson batches through ``PrivateTraining.empty_step``;
    the row names the mode ``auto`` resolved to.
Non-DP baselines
    the same model with a plain optimizer; for the LSTM also a model whose DPLSTM is replaced
    by ``torch.nn.LSTM`` of the same size (``nn.LSTM``), the issue's baseline.
Validity
    with ``noise_multiplier=0``, one step on a fixed batch must apply the gradient
    ``(sum_i clip(g_i)) / expected_batch_size`` (read from ``p.grad``), where ``clip(g_i)``
    is example ``i``'s own gradient (one example at a time, autograd in float64) scaled to
    norm at most ``max_grad_norm``. ``max_rel_err`` is the largest deviation relative to the
    largest entry of that clipped sum.
Memory
    ``peak_mb``: the largest amount of tensor memory allocated during one step beyond what was
    live when it began, from ``torch.profiler`` memory events (``profile_memory=True``) summed in
    time order, at operator granularity.

Usage::

    python benchmarks/dp_step_time.py                  # all families, batches 64 and 256
    python benchmarks/dp_step_time.py --families lstm --batches 64 --rounds 5
    python benchmarks/dp_step_time.py --product --modes hooks ew fast   # product path vs Opacus

Writes ``benchmarks/results/dp_step_time.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import opacus
import torch
from opacus import PrivacyEngine
from opacus.accountants import IAccountant, RDPAccountant
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedcare.models import (
    ClinicalLSTM,
    HashingTokenizer,
    LinearRegression,
    LogisticRegression,
    MedicalCNN,
    TextBagOfEmbeddings,
    TextLSTM,
)
from fedcare.privacy import engine as product_engine
from fedcare.privacy.fast_grad import make_private_fast, supports_fast_grad

logger = logging.getLogger(__name__)

RESULTS = Path(__file__).resolve().parent / "results" / "dp_step_time.json"
NOISE_MULTIPLIER = 1.0
MAX_GRAD_NORM = 1.0
LR = 0.05
DATASET_BATCHES = 8  # dataset = 8 batches, so Poisson sampling rate 1/8
OPACUS_MODES = ("hooks", "ghost", "functorch", "ew")
_LSTM_FAMILIES = ("lstm", "text_lstm")  # their non-DP baseline is the nn.LSTM twin
Batch = tuple[torch.Tensor, ...]


# ----------------------------------------------------------------------------- cases
@dataclass
class Family:
    """A model family: how to build the model, synthetic data of the right shape, the loss."""

    name: str
    build: Callable[[], nn.Module]
    data: Callable[[int, torch.Generator], TensorDataset]
    criterion: Callable[[], nn.Module]
    baselines: dict[str, Callable[[], nn.Module]] = field(default_factory=dict)


def _lstm(hidden: int) -> ClinicalLSTM:
    """Return the PhysioNet-2012-shaped ClinicalLSTM: 36 features + mask, binary head."""
    return ClinicalLSTM(36, 2, hidden_size=hidden, use_mask=True)


def _lstm_nn(hidden: int) -> ClinicalLSTM:
    """Return the same model with ``torch.nn.LSTM`` in place of DPLSTM (non-private baseline)."""
    model = _lstm(hidden)
    model.forward_lstm = nn.LSTM(72, hidden, batch_first=True)  # type: ignore[assignment]
    return model


TEXT_TOKENIZER = HashingTokenizer(buckets=4096, max_length=256)
"""The Medical Abstracts scenario's tokeniser (simulations/scenarios/medical_text.toml)."""


def _text_lstm(hidden: int) -> TextLSTM:
    """Return the text LSTM: 4096 + 1 buckets x 64, DPLSTM over 256 tokens, 5 classes."""
    return TextLSTM(5, embedding_dim=64, hidden_size=hidden, tokenizer=TEXT_TOKENIZER)


def _text_lstm_nn(hidden: int) -> TextLSTM:
    """Return the same text model with ``torch.nn.LSTM`` in place of DPLSTM (non-private baseline)."""
    model = _text_lstm(hidden)
    model.encoder.forward_lstm = nn.LSTM(64, hidden, batch_first=True)  # type: ignore[assignment]
    return model


def _texts(n: int, g: torch.Generator) -> TensorDataset:
    """Return ``n`` random texts of 100..256 tokens (ids, lengths, tags) and 5-class labels."""
    lengths = torch.randint(100, 257, (n,), generator=g)
    ids = torch.randint(1, TEXT_TOKENIZER.buckets + 1, (n, TEXT_TOKENIZER.max_length), generator=g)
    ids[torch.arange(TEXT_TOKENIZER.max_length).unsqueeze(0) >= lengths.unsqueeze(1)] = 0
    tags = torch.full((n,), TEXT_TOKENIZER.tag, dtype=torch.long)
    return TensorDataset(ids, lengths, tags, torch.randint(0, 5, (n,), generator=g))


def families(hidden: int) -> dict[str, Family]:
    """Return the benchmarked families, keyed by name."""

    def images(n: int, g: torch.Generator) -> TensorDataset:
        return TensorDataset(
            torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 2, (n,), generator=g).float()
        )

    def sequences(n: int, g: torch.Generator) -> TensorDataset:
        x = torch.randn(n, 48, 36, generator=g)
        mask = (torch.rand(n, 48, 36, generator=g) < 0.3).float()
        lengths = torch.full((n,), 48, dtype=torch.long)
        return TensorDataset(x, lengths, mask, torch.randint(0, 2, (n,), generator=g).float())

    def table(features: int, regression: bool) -> Callable[[int, torch.Generator], TensorDataset]:
        def make(n: int, g: torch.Generator) -> TensorDataset:
            x = torch.randn(n, features, generator=g)
            if regression:
                y = torch.randn(n, generator=g)
            else:
                y = torch.randint(0, 2, (n,), generator=g).float()
            return TensorDataset(x, y)

        return make

    return {
        "cnn": Family("cnn", lambda: MedicalCNN(1, 2, 28), images, nn.BCEWithLogitsLoss),
        "lstm": Family(
            "lstm",
            lambda: _lstm(hidden),
            sequences,
            nn.BCEWithLogitsLoss,
            baselines={"nn.LSTM": lambda: _lstm_nn(hidden)},
        ),
        "logistic": Family(
            "logistic", lambda: LogisticRegression(13), table(13, False), nn.BCEWithLogitsLoss
        ),
        "linear": Family("linear", lambda: LinearRegression(10), table(10, True), nn.MSELoss),
        "text_bag": Family(
            "text_bag",
            lambda: TextBagOfEmbeddings(5, embedding_dim=64, tokenizer=TEXT_TOKENIZER),
            _texts,
            nn.CrossEntropyLoss,
        ),
        "text_lstm": Family(
            "text_lstm",
            lambda: _text_lstm(hidden),
            _texts,
            nn.CrossEntropyLoss,
            baselines={"nn.LSTM": lambda: _text_lstm_nn(hidden)},
        ),
    }


# ----------------------------------------------------------------------------- variants
@dataclass
class Variant:
    """One way of training: a step function and the batches it cycles through."""

    name: str
    dp: bool
    step: Callable[[Batch], None]
    batches: list[Batch]
    accountant: IAccountant | None = None
    resolved: str | None = None
    steps_taken: int = 0

    def run(self, k: int) -> float:
        """Take ``k`` steps; return seconds per step."""
        n = len(self.batches)
        t0 = time.perf_counter()
        for i in range(k):
            self.step(self.batches[(self.steps_taken + i) % n])
        elapsed = time.perf_counter() - t0
        self.steps_taken += k
        return elapsed / k


def _make_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, criterion: Callable[..., Any]
) -> Callable[[Batch], None]:
    """Return one training step over a ``(*inputs, target)`` batch."""

    def step(batch: Batch) -> None:
        *inputs, target = batch
        optimizer.zero_grad()
        loss = criterion(model(*inputs), target)
        loss.backward()
        optimizer.step()

    return step


def _make_product_step(private: product_engine.PrivateTraining) -> Callable[[Batch], None]:
    """Return one training step as ``client.training`` takes it (empty batch: ``empty_step``)."""
    module, optimizer, criterion = private.module, private.optimizer, private.criterion

    def step(batch: Batch) -> None:
        *inputs, target = batch
        optimizer.zero_grad()
        if len(target) == 0:
            private.empty_step()
            return
        loss = criterion(module(*inputs), target)
        loss.backward()
        optimizer.step()

    return step


def make_private(
    mode: str,
    model: nn.Module,
    loader: DataLoader,
    criterion: nn.Module,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    lr: float,
    seed: int,
) -> tuple[nn.Module, Any, Callable[..., Any], DataLoader, IAccountant, str, Callable[[Batch], None]]:
    """Return ``(model, optimizer, criterion, loader, accountant, resolved mode, step)`` for ``mode``.

    ``mode="auto"`` goes through the product's ``fedcare.privacy.engine.make_private``.
    """
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    if mode == "auto":
        accountant = RDPAccountant()
        private = product_engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, criterion=criterion,
            accountant=accountant, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
            grad_sample_mode="auto", noise_generator=generator,
        )
        return (private.module, private.optimizer, private.criterion, private.data_loader,
                accountant, private.grad_sample_mode, _make_product_step(private))
    engine = PrivacyEngine(accountant="rdp")
    common: dict[str, Any] = {
        "module": model,
        "optimizer": optimizer,
        "data_loader": loader,
        "noise_multiplier": noise_multiplier,
        "max_grad_norm": max_grad_norm,
        "noise_generator": generator,
    }
    if mode == "fast":
        m, opt, dl = make_private_fast(engine, **common)
        crit: Callable[..., Any] = criterion
    elif mode == "ghost":
        m, opt, crit, dl = engine.make_private(
            **common, criterion=criterion, grad_sample_mode="ghost"
        )
    else:
        m, opt, dl = engine.make_private(**common, grad_sample_mode=mode)
        crit = criterion
    return m, opt, crit, dl, engine.accountant, mode, _make_step(m, opt, crit)


def build_variants(
    fam: Family, batch: int, modes: list[str], seed: int, n_batches: int = 8
) -> tuple[list[Variant], dict[str, str]]:
    """Build every variant of ``fam`` at ``batch``; return them and the modes that failed."""
    g = torch.Generator().manual_seed(seed)
    dataset = fam.data(batch * DATASET_BATCHES, g)
    variants: list[Variant] = []
    failed: dict[str, str] = {}
    base_models = {"torch": fam.build, **fam.baselines}
    for name, build in base_models.items():
        torch.manual_seed(seed)
        model = build()
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        loader = DataLoader(dataset, batch_size=batch, shuffle=True, generator=g)
        batches = [b for _, b in zip(range(n_batches), loader)]
        label = "DPLSTM" if (fam.name in _LSTM_FAMILIES and name == "torch") else name
        variants.append(Variant(label, False, _make_step(model, opt, fam.criterion()), batches))
    for mode in modes:
        torch.manual_seed(seed)
        model = fam.build()
        if mode == "fast" and not supports_fast_grad(model):
            continue
        loader = DataLoader(dataset, batch_size=batch, shuffle=True, generator=g)
        try:
            _m, _opt, _crit, dl, accountant, resolved, step = make_private(
                mode,
                model,
                loader,
                fam.criterion(),
                noise_multiplier=NOISE_MULTIPLIER,
                max_grad_norm=MAX_GRAD_NORM,
                lr=LR,
                seed=seed,
            )
            # Poisson sampling: batch sizes vary around `batch`
            batches = [b for _, b in zip(range(n_batches), dl)]
            v = Variant(mode, True, step, batches, accountant, resolved)
            v.run(1)  # fail here, not in the timing loop
            variants.append(v)
        except Exception as exc:  # noqa: BLE001 - a benchmark reports which modes do not apply
            failed[mode] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            logger.info("%s/%s failed: %s", fam.name, mode, failed[mode])
    return variants, failed


# ----------------------------------------------------------------------------- validity
def reference_clipped_sum(
    model: nn.Module, batch: Batch, criterion: nn.Module, max_grad_norm: float
) -> list[torch.Tensor]:
    """Return sum_i clip(g_i) over the batch, one example at a time, in float64."""
    model = copy.deepcopy(model).double()
    batch = tuple(t.double() if t.is_floating_point() else t for t in batch)
    *inputs, target = batch
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(target)):
        model.zero_grad()
        loss = criterion(model(*(t[i : i + 1] for t in inputs)), target[i : i + 1])
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum((g**2).sum() for g in grads)).item()
        factor = min(1.0, max_grad_norm / (norm + 1e-6))
        for acc, g in zip(total, grads):
            acc.add_(g, alpha=factor)
    return [t.float() for t in total]


def check_clipping(fam: Family, batch: int, mode: str, seed: int) -> float:
    """Return the max relative error of ``mode``'s clipped gradient sum (noise off) vs reference."""
    g = torch.Generator().manual_seed(seed)
    dataset = fam.data(batch * DATASET_BATCHES, g)
    torch.manual_seed(seed)
    model = fam.build()
    reference_model = copy.deepcopy(model)
    fixed = tuple(t[:batch] for t in dataset.tensors)
    max_grad_norm = 0.1  # small enough that most examples are clipped
    expected = reference_clipped_sum(reference_model, fixed, fam.criterion(), max_grad_norm)
    loader = DataLoader(dataset, batch_size=batch)
    _m, opt, _crit, _dl, _acc, _resolved, step = make_private(
        mode, model, loader, fam.criterion(), noise_multiplier=0.0, max_grad_norm=max_grad_norm,
        lr=1.0, seed=seed,
    )
    expected_batch_size = opt.expected_batch_size
    step(fixed)
    # p.grad is what SGD applied: (clipped sum + noise) / expected batch size, noise = 0 here
    got = [p.grad * expected_batch_size for p in model.parameters() if p.requires_grad]
    scale = max(e.abs().max().item() for e in expected)
    return max((x - e).abs().max().item() for x, e in zip(got, expected)) / scale


# ----------------------------------------------------------------------------- memory
def peak_step_memory(variant: Variant) -> float:
    """Return MB of tensor memory allocated at the peak of one step, beyond the start."""
    from torch.profiler import ProfilerActivity, profile

    batch = variant.batches[0]
    variant.step(batch)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        variant.step(batch)
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak / 2**20


# ----------------------------------------------------------------------------- main
def run_case(
    fam: Family, batch: int, modes: list[str], rounds: int, seed: int, target_s: float
) -> dict[str, Any]:
    """Time, memory-profile and check every variant of one family at one batch size."""
    variants, failed = build_variants(fam, batch, modes, seed)
    for v in variants:  # warm-up
        v.run(2)
    # steps per block: about ``target_s`` of the slowest variant, at least one
    slowest = max(v.run(1) for v in variants)
    inner = max(1, int(target_s / slowest))
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    for r in range(rounds):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for v in order:
            times[v.name].append(v.run(inner))
    rows: dict[str, dict[str, Any]] = {}
    baseline_name = "nn.LSTM" if fam.name in _LSTM_FAMILIES else "torch"
    medians = {k: statistics.median(v) for k, v in times.items()}
    for v in variants:
        row: dict[str, Any] = {
            "dp": v.dp,
            "median_ms": medians[v.name] * 1e3,
            "q1_ms": statistics.quantiles(times[v.name], n=4)[0] * 1e3,
            "q3_ms": statistics.quantiles(times[v.name], n=4)[2] * 1e3,
            "ratio": medians[v.name] / medians[baseline_name],
            "peak_mb": peak_step_memory(v),
        }
        if fam.name in _LSTM_FAMILIES:
            row["ratio_vs_dplstm"] = medians[v.name] / medians["DPLSTM"]
        if v.dp:
            row["max_rel_err"] = check_clipping(fam, batch, v.name, seed)
            row["valid"] = row["max_rel_err"] < 1e-4
            assert v.accountant is not None
            row["resolved"] = v.resolved
            row["accountant_steps"] = sum(h[2] for h in v.accountant.history)
            row["optimizer_steps"] = v.steps_taken + 1  # +1: the memory-profiled step
        rows[v.name] = row
    dp_rows = {k: r for k, r in rows.items() if r["dp"] and r.get("valid")}
    fastest = min(dp_rows, key=lambda k: dp_rows[k]["median_ms"]) if dp_rows else None
    return {
        "family": fam.name,
        "batch": batch,
        "baseline": baseline_name,
        "steps_per_block": inner,
        "rounds": rounds,
        "variants": rows,
        "failed": failed,
        "fastest_dp": fastest,
    }


def print_table(results: list[dict[str, Any]]) -> None:
    """Print the results as a table (rich when available, plain text otherwise)."""
    header = ["family", "batch", "variant", "median ms", "IQR ms", "x non-DP", "peak MB", "valid"]
    lines = []
    for case in results:
        for name, r in case["variants"].items():
            ratio = f"{r['ratio']:.2f}"
            if "ratio_vs_dplstm" in r:
                ratio += f" ({r['ratio_vs_dplstm']:.2f} vs DPLSTM)"
            valid = "" if not r["dp"] else ("yes" if r["valid"] else f"NO ({r['max_rel_err']:.1e})")
            star = " *" if name == case["fastest_dp"] else ""
            if r.get("resolved") and r["resolved"] != name:
                name = f"{name}={r['resolved']}"
            lines.append(
                [
                    case["family"],
                    str(case["batch"]),
                    ("DP " if r["dp"] else "") + name + star,
                    f"{r['median_ms']:.3f}",
                    f"{r['q1_ms']:.3f}-{r['q3_ms']:.3f}",
                    ratio,
                    f"{r['peak_mb']:.3f}",
                    valid,
                ]
            )
        for mode, why in case["failed"].items():
            lines.append(
                [case["family"], str(case["batch"]), f"DP {mode}", "-", "-", "-", "-", why]
            )
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="DP step time (x non-DP: vs torch model; LSTM: vs nn.LSTM)")
        for h in header:
            table.add_column(h)
        for line in lines:
            table.add_row(*line)
        Console(width=160).print(table)
    except ImportError:  # pragma: no cover
        widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
        print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        for line in lines:
            print("  ".join(c.ljust(w) for c, w in zip(line, widths)))


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=["cnn", "lstm", "logistic", "linear"])
    parser.add_argument("--batches", nargs="+", type=int, default=[64, 256])
    parser.add_argument("--modes", nargs="+", default=[*OPACUS_MODES, "fast"])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds per case")
    parser.add_argument("--block-seconds", type=float, default=0.1, help="time per block of steps")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--lstm-hidden", type=int, default=32, help="ModelSpec's default is 32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--product",
        action="store_true",
        help='also time the product path: fedcare.privacy.engine.make_private(grad_sample_mode="auto")',
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", module="opacus")  # secure_mode / RNG notices, not results
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # Opacus hooks mode
    torch.set_num_threads(args.threads)
    fams = families(args.lstm_hidden)
    if args.product and "auto" not in args.modes:
        args.modes = [*args.modes, "auto"]
    results = []
    for name in args.families:
        for batch in args.batches:
            logger.warning("running %s at batch %d", name, batch)
            results.append(
                run_case(fams[name], batch, args.modes, args.rounds, args.seed, args.block_seconds)
            )
    print_table(results)
    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "load_avg_end": os.getloadavg(),
        },
        "python": platform.python_version(),
        "torch": torch.__version__,
        "opacus": opacus.__version__,
        "threads": torch.get_num_threads(),
        "noise_multiplier": NOISE_MULTIPLIER,
        "max_grad_norm": MAX_GRAD_NORM,
        "sample_rate": 1 / DATASET_BATCHES,
        "lstm_hidden": args.lstm_hidden,
        "timing": "median over interleaved rounds of seconds/step "
        "(one block of steps per variant per round)",
        "memory": "torch.profiler profile_memory: peak of allocated-minus-freed tensor bytes "
        "during one step, beyond what was live at its start",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
