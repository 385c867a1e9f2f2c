"""How far the int4 variant's logits sit from the fp32 source's, teacher-forced (the figures
behind tests/agreement.py's tolerances): largest and median difference, and the steps where the
argmax moved with the source's top-2 margin there.

    LLAMADESK_HOME=... python tests/bench/fast_path_agreement.py
    LLAMADESK_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 LLAMADESK_HOME=... python tests/bench/fast_path_agreement.py
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from agreement import forced_logits, greedy_answer  # noqa: E402
from test_quantize_e2e import PROMPT  # noqa: E402

from app import store  # noqa: E402
from app.engine import choose_decoder, load_model  # noqa: E402
from model.tokenizer import load_tokenizer  # noqa: E402


def main() -> None:
    source = store.find("smollm2-135m-instruct:float")
    ids = load_tokenizer(source.path).encode(PROMPT)[:64]
    model = load_model(source, 256)
    decoder = choose_decoder(model)
    answer = greedy_answer(model, ids, 64, decoder)
    reference = forced_logits(model, ids, answer, decoder)
    int4 = store.find("smollm2-135m-instruct:int4")
    for name, precise in (("precise", True), ("default", False)):
        m = load_model(int4, 256, precise=precise)
        got = forced_logits(m, ids, answer, choose_decoder(m))
        diff = (got - reference).abs().amax(-1)
        top2 = reference.topk(2, -1).values
        margin = top2[:, 0] - top2[:, 1]
        moved = (got.argmax(-1) != reference.argmax(-1)).nonzero().flatten().tolist()
        print(f"{torch.backends.cpu.get_cpu_capability()} int4 {name}: largest {diff.max():.4f}, median "
              f"{diff.median():.4f}, argmax moved at {[(i, round(float(margin[i]), 4)) for i in moved]}")


if __name__ == "__main__":
    main()
