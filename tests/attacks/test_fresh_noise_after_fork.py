"""Attack: a warm node forks every task from one process, so every DP round adds the same noise.

The coordinator runs two training rounds on a warm node (``client.warm_exec``: each ClientApp
task is ``os.fork()``-ed from one pre-loaded process). If both tasks inherit the parent's
generator state, they draw identical DP noise and identical Poisson batches: the difference of
the two updates is then a noise-free function of the data, while the ledger charges the rounds
as independent. Here the attacker sends the *same* model and data to two forked tasks: with
fresh noise the replies differ, with inherited noise they are bit-identical.

Each scenario runs in a fresh interpreter (``python THIS_FILE SCENARIO DIR``) that plays the warm
parent and forks the tasks itself: pytest's own process has thread pools (torch, gRPC, Ray) from
earlier tests, and forking a multi-threaded process can deadlock, which a warm SuperExec (that
computes nothing before it forks) never is.
"""

from __future__ import annotations

import os
import pickle
import random
import select
import signal
import subprocess
import sys
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from sklearn.datasets import load_breast_cancer

from fedcare.client.dataset import SiteData, Split
from fedcare.client.training import TrainSettings, train_local
from fedcare.models import ModelSpec, build_for_data, build_model, get_weights, wire
from fedcare.privacy.ledger import PrivacyLedger
from fedcare.privacy.settings import PrivacySettings
from fedcare.server.app import train_config
from fedcare.server.config import RunConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "fixtures"))

from scenarios import write_wdbc_site  # noqa: E402

CHILD_TIMEOUT_S = 120.0
PARENT_TIMEOUT_S = 400.0


def _in_forked_child(task: Callable[[], Any]) -> Any:
    """Run ``task`` in an ``os.fork()``-ed child (as the warm SuperExec does) and return its result."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            os.close(read_fd)
            # the parent built a model (torch's OpenMP pool may exist); a forked child keeps to one thread
            torch.set_num_threads(1)
            payload = pickle.dumps(task())
            with os.fdopen(write_fd, "wb") as out:
                out.write(payload)
            code = 0
        except BaseException:  # noqa: BLE001 - report in the child, then leave
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(write_fd)
    chunks: list[bytes] = []
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    try:
        with os.fdopen(read_fd, "rb", buffering=0) as pipe:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"forked task did not finish within {CHILD_TIMEOUT_S} s")
                ready, _, _ = select.select([pipe], [], [], left)
                if ready:
                    chunk = pipe.read(1 << 16)
                    if not chunk:
                        break
                    chunks.append(chunk)
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
            if time.monotonic() > deadline:
                raise TimeoutError("forked task did not exit")
            time.sleep(0.01)
    except BaseException:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        raise
    assert os.waitstatus_to_exitcode(done[1]) == 0, "the forked task failed (its traceback is in the captured stderr)"
    return pickle.loads(b"".join(chunks))


def _site() -> SiteData:
    x, y = load_breast_cancer(return_X_y=True)
    x = ((x - x.mean(0)) / (x.std(0) + 1e-8)).astype(np.float32)
    split = Split(inputs=(torch.tensor(x),), targets=torch.tensor(y, dtype=torch.long))
    return SiteData(name="bc", kind="table", task="binary", num_classes=2, input_shape=(30,),
                    train=split, val=split, test=split)


def _dp_round(data: SiteData, start: dict[str, torch.Tensor], ledger_dir: Path, seed: int | None) -> dict[str, np.ndarray]:
    """One DP-SGD round of ``train_local`` from ``start``; return the trained weights."""
    model = build_model("logistic", in_features=30)
    model.load_state_dict(start)
    ledger = PrivacyLedger.open(ledger_dir, site="bc", study="fork")
    train_local(model, data, train=TrainSettings(local_epochs=1, batch_size=64, lr=0.5, seed=seed, device="cpu"),
                privacy=PrivacySettings.with_noise(noise_multiplier=1.0, epsilon_budget=50.0), ledger=ledger,
                planned_rounds=3, round_index=1)
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _assert_differ(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    assert any(not np.array_equal(a[k], b[k]) for k in a), "two forked DP rounds released identical updates"


def _in_fresh_parent(scenario: str, folder: Path) -> Any:
    """Run ``scenario`` in a fresh interpreter that forks its tasks; return what it pickled."""
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [sys.executable, __file__, scenario, str(folder)],
        capture_output=True, text=True, timeout=PARENT_TIMEOUT_S, check=False,
    )
    assert done.returncode == 0, f"scenario {scenario} failed:\n{done.stderr[-4000:]}"
    return pickle.loads((folder / "result.pkl").read_bytes())


def _scenario_global_randomness(folder: Path) -> Any:
    """The warm parent's generators in one fixed state; two tasks draw from each global generator."""
    torch.manual_seed(0)
    np.random.seed(0)  # noqa: NPY002 - the legacy global is what the attack targets
    random.seed(0)

    def draw() -> tuple[list[float], list[float], list[float]]:
        return torch.rand(4).tolist(), np.random.rand(4).tolist(), [random.random() for _ in range(4)]  # noqa: NPY002

    return _in_forked_child(draw), _in_forked_child(draw)


def _scenario_dp_rounds(folder: Path, seeds: tuple[int | None, ...]) -> list[dict[str, np.ndarray]]:
    """The same DP round (same model, same data) in one forked task per seed."""
    data = _site()
    torch.manual_seed(0)
    start = build_model("logistic", in_features=30).state_dict()
    return [_in_forked_child(lambda i=i, seed=seed: _dp_round(data, start, folder / f"ledger-{i}", seed=seed))
            for i, seed in enumerate(seeds)]


def test_two_tasks_forked_from_one_process_draw_different_global_randomness(tmp_path: Path) -> None:
    # Prepare / Execute: a parent with fixed generator states forks two tasks
    first, second = _in_fresh_parent("global", tmp_path)

    # Assert: torch's, NumPy's and random's global streams all differ between the two tasks
    for one, two in zip(first, second, strict=True):
        assert one != two


def test_two_dp_rounds_forked_from_one_process_add_different_noise(tmp_path: Path) -> None:
    # Prepare / Execute: the same round in two forked tasks of a site without a seed
    first, second = _in_fresh_parent("unseeded", tmp_path)

    # Assert: fresh noise and batches in each task, so the updates differ
    _assert_differ(first, second)


def test_an_explicit_seed_still_repeats_exactly_in_forked_tasks(tmp_path: Path) -> None:
    # Prepare / Execute: simulations and tests set an explicit (site-owned) seed
    first, second, other = _in_fresh_parent("seeded", tmp_path)

    # Assert: bit-identical with the same seed (reproducible simulations), different with another
    assert first.keys() == second.keys()
    for k in first:
        np.testing.assert_array_equal(first[k], second[k])
    _assert_differ(first, other)




def _train_message() -> Message:
    """The coordinator's train message; it even names a seed in its config (the site must ignore it)."""
    config = RunConfig(input_shape=(30,), num_rounds=3, min_sites=1, checkpoint_dir=Path("/nonexistent"),
                       batch_size=32, lr=0.5, study="fork-attack", seed=0)
    record = train_config(config)
    record[wire.MODEL_SPEC] = ModelSpec(family="logistic").model_dump_json()
    record[wire.SERVER_ROUND] = 1
    record["seed"] = 0  # the attacker's attempt to fix the site's noise
    torch.manual_seed(0)
    model = build_for_data(ModelSpec(family="logistic"), task="binary", num_classes=2, input_shape=(30,), has_mask=False)
    content = RecordDict({
        wire.ARRAYS: ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in get_weights(model).items())),
        wire.CONFIG: record,
    })
    if TaskIdentity._run_id is None:  # noqa: SLF001 - what flwr sets in a running app (as InProcessGrid does)
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    msg = Message(content, dst_node_id=1, message_type="train")
    msg.metadata.__dict__["_message_id"] = "msg-1"
    return msg


def _scenario_warm_node(folder: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A deployed node (node config, no seed) preloaded as client.warm_exec does; two forked train tasks."""
    from fedcare.client import warm_exec
    from fedcare.client.app import app

    manifest = write_wdbc_site(folder)
    policy = folder / "policy.toml"
    policy.write_text("require_secure_aggregation = false\n", encoding="utf-8")  # plain rounds for the test
    warm_exec.preload(str(manifest))
    msg = _train_message()
    torch.manual_seed(0)

    def task(ledger: str) -> dict[str, np.ndarray]:
        node = {"site-manifest": str(manifest), "ledger-dir": str(folder / ledger), "policy": str(policy)}
        context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
        reply = app(msg, context)
        assert not reply.has_error(), reply.error.reason
        return {k: v.numpy() for k, v in reply.content[wire.ARRAYS].items()}

    return _in_forked_child(lambda: task("ledger-a")), _in_forked_child(lambda: task("ledger-b"))


def test_two_train_tasks_forked_from_a_warm_node_reply_with_different_updates(tmp_path: Path) -> None:
    # Prepare / Execute: two train tasks forked from the warm process, the same message to each
    first, second = _in_fresh_parent("warm-node", tmp_path)

    # Assert
    _assert_differ(first, second)


_SCENARIOS: dict[str, Callable[[Path], Any]] = {
    "global": _scenario_global_randomness,
    "unseeded": lambda folder: _scenario_dp_rounds(folder, (None, None)),
    "seeded": lambda folder: _scenario_dp_rounds(folder, (1234, 1234, 1235)),
    "warm-node": _scenario_warm_node,
}


if __name__ == "__main__":  # the fresh parent process of one scenario
    _name, _folder = sys.argv[1], Path(sys.argv[2])
    (_folder / "result.pkl").write_bytes(pickle.dumps(_SCENARIOS[_name](_folder)))
