"""Where a cold `ask` spends its time and memory: its steps one by one in this process, each line
the seconds since start and VmRSS / VmHWM (peak) in MiB from /proc/self/status (Linux).

    LLAMADESK_HOME=... python tests/bench/cold_start_stages.py --model llama-1b:source --ctx 512

The steps are Engine.load's and Engine.stream's (app/engine.py), called one at a time.
"""
import time

T0 = time.perf_counter()

import argparse  # noqa: E402  (the clock starts before the imports it measures)


def stage(what: str) -> None:
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    mib = lambda key: int(status[key].split()[0]) // 1024  # kB -> MiB
    print(f"{time.perf_counter() - T0:6.2f} s  RSS {mib('VmRSS'):5d}  peak {mib('VmHWM'):5d} MiB  {what}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="installed model, NAME:VARIANT")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", default="The capital of France is")
    a = ap.parse_args()
    stage("python started")
    import torch

    stage("import torch")
    from app import engine, pull, store
    from app.devices import inference_threads, probe
    from app.plan import plan_installed
    from model.chat_format import choose_chat_format
    from model.generate import SamplingParams
    from model.tokenizer import load_tokenizer

    stage("import app, model, quant")
    torch.set_num_threads(inference_threads(a.threads))
    pull.compile_decode_step(None)
    plan = plan_installed(a.model, a.ctx, "auto", device=probe()).chosen
    entry = store.find(plan.ref)
    tokenizer = load_tokenizer(entry.path)
    chat_format, _ = choose_chat_format(tokenizer, entry.name, None, store.settings(entry.name).get("chat-format"))
    stage("plan, store, tokenizer, chat format")
    model = engine.load_model(entry, plan.ctx, plan.device, kv_dtype=plan.kv_dtype)
    stage(f"load_model (KV cache {plan.kv_dtype}, {plan.ctx} tokens)")
    ask = engine.Engine(entry, model, tokenizer, chat_format, plan.ctx, plan.device)
    ask.decoder = engine.choose_decoder(model, "now")
    stage(f"decoder: {type(ask.decoder).__name__}")
    pieces = ask.stream([{"role": "user", "content": a.prompt}], SamplingParams(temperature=0), 16)
    next(pieces)
    stage(f"prefill, {ask.last.prompt_tokens} tokens")
    for _ in pieces:
        pass
    stage(f"{ask.last.new_tokens} tokens")


if __name__ == "__main__":
    main()
