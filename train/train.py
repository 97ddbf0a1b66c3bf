"""Trains vattn's small long-context model: a Llama-architecture byte-level model on public-domain
text (the King James Bible, Debian package bible-kjv) mixed with RULER-family tasks
(python/vattn/tasks.py), deterministic given --seed.

    python3 train/train.py --out models/kjv-ruler-18m --steps 2200            # one H100/H200
    python3 train/train.py --out /tmp/m --steps 3 --batch 2 --length 1024 --small   # CPU check

With --checkpoint F --max-minutes M the run saves its whole state to F after M minutes and exits
with status 3; the same command with --resume goes on from there, with the same data, so a run can
be split over machine leases and still equal an uninterrupted one.

Each batch row is packed with documents: passages of text (language-model loss on every byte)
and task prompts with their answers. Documents start at 256 bytes and their longest length
doubles up to --length by 60% of the steps (a curriculum: retrieval is learnt on short contexts
first). The loss is the mean over text bytes plus the mean over answer bytes, so the few answer
bytes of a long prompt weigh as much as the text. Writes the HF model (safetensors), the tokenizer and
train_log.json (loss curve, settings, throughput).
"""

import argparse
import json
import math
import multiprocessing
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
import transformers

import importlib.util

_here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _here)
from tokenizer import BOS, EOS, PAD, VOCAB, save_tokenizer  # noqa: E402

# The task generators are the package's pure-Python module; loaded by path, so training needs no
# built vattn extension.
_spec = importlib.util.spec_from_file_location(
    "vattn_tasks", os.path.join(_here, "..", "python", "vattn", "tasks.py"))
tasks = sys.modules["vattn_tasks"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tasks)

TEXT_SHARE = 0.3


def model_config(small: bool, length: int) -> transformers.LlamaConfig:
    if small:  # for checks on a CPU
        size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=1, head_dim=16)
    else:  # ~17.7M parameters: 8 layers, GQA 4:1, head_dim 64
        size = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                    num_attention_heads=8, num_key_value_heads=2, head_dim=64)
    return transformers.LlamaConfig(
        vocab_size=VOCAB, max_position_embeddings=2 * length, rope_theta=100000.0,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=True,
        initializer_range=0.02, **size)


def document(rng, hay, n: int):
    """One document of about n bytes: (ids, loss kinds 1 text / 2 answer), BOS first."""
    if rng.random() < TEXT_SHARE:
        doc = np.frombuffer(hay.text(rng, n - 1), dtype=np.uint8)
        return np.concatenate([[BOS], doc]), np.concatenate([[0], np.ones(len(doc), np.int8)])
    task = tasks.TASKS[int(rng.integers(0, len(tasks.TASKS)))]
    s = tasks.make(task, rng, hay, max(n - 48, 160))
    p = np.frombuffer(s.prompt, dtype=np.uint8)
    a = np.frombuffer(s.target, dtype=np.uint8)
    ids = np.concatenate([[BOS], p, a, [EOS]])
    kind = np.concatenate([[0], np.ones(len(p), np.int8), np.full(len(a) + 1, 2, np.int8)])
    return ids, kind


def curriculum(step: int, steps: int, length: int) -> int:
    """Longest document at this step: 256 bytes doubling up to `length` by 60% of training."""
    ramp = 0.6 * steps
    doublings = math.log2(max(length / 256, 1))
    return int(min(length, 256 * 2 ** (doublings * min(step / max(ramp, 1), 1.0))))


def make_batch(rng, hay, batch: int, length: int, longest: int):
    """ids [batch, length] packed with documents of lengths in [longest/4, longest], and the loss
    kind of predicting each position: 0 none, 1 text, 2 answer (the label is the next id)."""
    ids = np.full((batch, length), PAD, dtype=np.int64)
    kind = np.zeros((batch, length), dtype=np.int8)
    for r in range(batch):
        at = 0
        while length - at >= 160:
            n = min(int(rng.integers(max(longest // 4, 160), longest + 1)), length - at)
            d, k = document(rng, hay, n)
            d, k = d[:length - at], k[:length - at]
            ids[r, at:at + len(d)] = d
            kind[r, at:at + len(k)] = k
            at += len(d)
    return torch.from_numpy(ids), torch.from_numpy(kind)


_worker = {}


def _init_worker(corpus_path, seed, batch, length, steps):
    _worker.update(hay=tasks.Haystack(tasks.load_corpus(corpus_path)), seed=seed, batch=batch,
                   length=length, steps=steps)


def _step_batch(step: int):
    """The batch of one step, from its own generator: the same for any number of workers."""
    w = _worker
    rng = np.random.default_rng([w["seed"], step])
    return make_batch(rng, w["hay"], w["batch"], w["length"],
                      curriculum(step, w["steps"], w["length"]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--corpus", help="haystack text file (default: the bible-kjv package)")
    ap.add_argument("--max-minutes", type=float, default=0,
                    help="stop after this long: with --checkpoint, save the state there and exit "
                         "with status 3 so that --resume goes on; without, save the model as it is "
                         "(then not deterministic; logged)")
    ap.add_argument("--checkpoint", help="file for the training state (model, optimiser, step)")
    ap.add_argument("--resume", action="store_true",
                    help="continue from --checkpoint when it exists (the same data follows)")
    ap.add_argument("--small", action="store_true", help="a tiny model, for checks")
    ap.add_argument("--workers", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 2)),
                    help="processes generating batches (the data is the same for any number)")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    state = None
    if args.resume and args.checkpoint and os.path.exists(args.checkpoint):
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
        print(f"resuming at step {state['step']} from {args.checkpoint}", flush=True)
    first = state["step"] if state else 0
    pool = multiprocessing.get_context("fork").Pool(
        args.workers, _init_worker, (args.corpus, args.seed, args.batch, args.length, args.steps))
    batches = pool.imap(_step_batch, range(first, args.steps), chunksize=1)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.use_deterministic_algorithms(False)
    config = model_config(args.small, args.length)
    config._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(config).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters on {dev}", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), fused=dev.type == "cuda")

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    log = {"args": vars(args), "parameters": n_params, "device": str(dev),
           "gpu": torch.cuda.get_device_name(0) if dev.type == "cuda" else None,
           "torch": torch.__version__, "transformers": transformers.__version__, "curve": []}
    t0 = time.time()
    tokens = 0
    if state:  # the run so far: weights, optimiser moments, curve, clock and token count
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        log["curve"], log["sessions"] = state["curve"], state["sessions"]
        t0 -= state["seconds"]
        tokens = state["tokens"]
    log.setdefault("sessions", []).append({"first_step": first, "started": time.time()})
    t_session = time.time()
    step = first
    suspended = False
    for step in range(first, args.steps):
        ids, kind = next(batches)
        ids, kind = ids.to(dev, non_blocking=True), kind.to(dev, non_blocking=True)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            logits = model(input_ids=ids).logits[:, :-1].float()
        target, k = ids[:, 1:], kind[:, 1:]  # kind[t]: what predicting ids[t] teaches
        ce = F.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1), reduction="none")
        ce = ce.view_as(target)
        text = (ce * (k == 1)).sum() / (k == 1).sum().clamp(min=1)
        answer = (ce * (k == 2)).sum() / (k == 2).sum().clamp(min=1)
        loss = text + answer
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens += int((kind > 0).sum())
        if step % 25 == 0 or step == args.steps - 1:
            el = time.time() - t0
            row = {"step": step, "longest": curriculum(step, args.steps, args.length),
                   "text_loss": text.item(), "answer_loss": answer.item(),
                   "lr": lr_at(step), "seconds": round(el, 1), "tokens": tokens}
            log["curve"].append(row)
            print(json.dumps(row), flush=True)
        if args.max_minutes and time.time() - t_session > 60 * args.max_minutes \
                and step + 1 < args.steps:
            if args.checkpoint:
                suspended = True
                print(f"suspending after step {step}: --max-minutes reached", flush=True)
            else:
                log["stopped_early_at_step"] = step
                print(f"stopping at step {step}: --max-minutes reached", flush=True)
            break
    pool.terminate()
    if suspended:
        torch.save({"step": step + 1, "model": model.state_dict(), "optimizer": opt.state_dict(),
                    "curve": log["curve"], "sessions": log["sessions"],
                    "seconds": time.time() - t0, "tokens": tokens}, args.checkpoint)
        print(f"state saved to {args.checkpoint}; go on with --resume", flush=True)
        sys.exit(3)
    log["steps_done"] = step + 1
    log["seconds"] = round(time.time() - t0, 1)
    log["tokens_per_second"] = round(tokens / max(log["seconds"], 1e-9))

    os.makedirs(args.out, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(args.out)
    save_tokenizer(args.out)
    with open(os.path.join(args.out, "train_log.json"), "w") as f:
        json.dump(log, f, indent=1)
    print(f"saved to {args.out} after {log['seconds']} s", flush=True)


if __name__ == "__main__":
    main()
