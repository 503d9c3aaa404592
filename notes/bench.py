"""
Honest timing of train.py's training step: warm-up steps (compilation, allocator) outside the
timed region, then N timed steps of the real loop (data, masks, forward, backward, AdamW, EMA)
between two synchronizations. Prints one `bench {json}` line: ms/step, img/s, time blocked on the
DataLoader (near 0 when it keeps up), peak memory and MFU (on a GPU of known peak), and the
recompilations after the warm-up.

  python notes/bench.py --steps 30 --warmup 5 --text_cond none      # any train.py flag after these
  python notes/bench.py --steps 30 --warmup 10 --one_batch --preset vit_b16 --device cuda

--one_batch reuses one batch for every step: the step alone, no loader. A benchmark writes nothing:
its tokenizer stays in memory and out_dir is left as it was. notes/perf.md has the measurements.
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import train  # noqa: E402


def bench(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation happens here)")
    p.add_argument("--one_batch", action="store_true", help="every step reuses one batch (the step alone)")
    args, rest = p.parse_known_args(argv)
    tcfg, mcfg = train.parse_args(rest)
    if tcfg.num_workers < 0:
        tcfg.num_workers = train.auto_workers()
    rt = train.setup(tcfg)
    train_set, _ = train.datasets(tcfg, mcfg)
    tokenizer = data.train_tokenizer(train_set.captions_for_tokenizer(), mcfg.vocab_size)  # in memory only
    mcfg.vocab_size = max(mcfg.vocab_size, tokenizer.get_vocab_size())
    collate = data.Collate(tokenizer, mcfg.n_captions, mcfg.max_words)
    raw_model, opt = train.build_model(mcfg, tcfg, rt)
    model = train.wrap(raw_model, rt)
    batches = iter(train.make_loader(train_set, collate, tcfg, rt, 0))
    one = next(batches) if args.one_batch else None
    next_batch = (lambda: one) if args.one_batch else (lambda: next(batches))

    import torch._dynamo.utils as dynamo_utils
    sync = torch.cuda.synchronize if rt.device.type == "cuda" else (lambda: None)
    for step in range(args.warmup):
        train.train_step(step, model, raw_model, opt, next_batch, tcfg, mcfg, rt)
    sync()
    graphs = dynamo_utils.counters["stats"]["unique_graphs"]
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    flops, n_img, wait, t0 = 0.0, 0, 0.0, time.perf_counter()
    for step in range(args.warmup, args.warmup + args.steps):
        out = train.train_step(step, model, raw_model, opt, next_batch, tcfg, mcfg, rt)
        flops += raw_model.flops_per_image(*out["shapes"]) * out["n_img"]
        n_img, wait = n_img + out["n_img"], wait + out["data_wait"]
    sync()
    dt, peak, gpu = time.perf_counter() - t0, train.peak_flops(rt), rt.device.type == "cuda"
    rec = dict(text_cond=mcfg.text_cond, img_size=mcfg.img_size, width=mcfg.width, batch_size=tcfg.batch_size,
               compile=rt.compile, device=torch.cuda.get_device_name(rt.device) if gpu else "cpu",
               threads=torch.get_num_threads(), workers=tcfg.num_workers, torch=torch.__version__, steps=args.steps,
               ms_per_step=1000 * dt / args.steps, img_per_s=n_img / dt, data_wait_ms_per_step=1000 * wait / args.steps,
               peak_mem_gb=torch.cuda.max_memory_allocated(rt.device) / 1e9 if gpu else None,
               mfu=flops / dt / rt.world / peak if peak else None,
               recompiles_after_warmup=dynamo_utils.counters["stats"]["unique_graphs"] - graphs)
    rt.print0("bench " + json.dumps(rec))
    return rec


if __name__ == "__main__":
    try:
        bench()
    except data.UserError as e:
        sys.exit(f"error: {e}")
