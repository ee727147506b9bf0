"""Shared fixtures: a tiny tokenizer and tiny models built from config in a temp dir, with no network."""

from __future__ import annotations

import os
import random

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train's controller polls its workers every 2 s by default: each fit would wait that long to notice a start, a
# registered save, a dead worker or the end. Ray propagates this to the controller and workers of every test fit.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

WORDS = (
    "the quick brown fox jumps over a lazy dog while seven wizards quietly hex bold jovial "
    "zebras and music plays in the garden of stars near old river stones"
).split()


def argmax_reference(model, ids: list[int], steps: int, eos, keep_eos: bool = False) -> list[int]:
    """Greedy tokens from plain full forward passes (no cache, no padding), stopping at eos (an id, or a list of them;
    kept if `keep_eos`)."""
    eos = set(eos) if isinstance(eos, (list, tuple, set)) else {eos}
    import torch

    out = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(torch.tensor([out])).logits[0, -1].argmax())
            if nxt in eos:
                if keep_eos:
                    out.append(nxt)
                break
            out.append(nxt)
    return out[len(ids) :]


def make_corpus(n_lines: int = 400, seed: int = 0) -> list[str]:
    """Deterministic English-like lines for tokenizer and dataset tests."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))).capitalize() + "." for _ in range(n_lines)]


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(make_corpus()) + "\n")
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus_file):
    from aitextgen_batch.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer([corpus_file], vocab_size=400, output=out, min_frequency=1)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir):
    from aitextgen_batch.tokenizer import init_model

    out = tmp_path_factory.mktemp("models") / "tiny-gpt2"
    init_model("tiny", tokenizer_dir, out, seed=0)
    return out


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray with 2 CPUs for the whole session (jobs and trainers join it).

    Always a new local Ray (`address="local"`): never one another run on this machine started, so that concurrent
    test runs cannot collide, and never the head that /tmp/ray/ray_current_cluster names (it may be dead).
    """
    import ray

    if not ray.is_initialized():
        # No dashboard: nothing here uses it, and its dozen processes would compete for the 2 CPUs all session.
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_address(ray_local) -> str:
    """The session Ray's address: a command run in a subprocess joins it (`--address`) instead of starting its own."""
    return ray_local.get_runtime_context().gcs_address


def free_port() -> int:
    """A TCP port on 127.0.0.1 where nothing listens (a dead address)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run only where CUDA is available."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
