"""A call after each layer a prompt runs, whichever runs it: the model's forward (a forward hook
on each block) or the CPU step's prompt path (quant/decode_cpu.py's run_prompt_chunk, which hands
the step one block at a time). Tests of a stop during a prompt count layers with it."""
from __future__ import annotations

from typing import Callable

from quant import decode_cpu


def after_each_prompt_layer(monkeypatch, model, on_layer: Callable[[], None]) -> list:
    """on_layer() after every block a prompt runs through `model`'s forward or the CPU step;
    returns the forward hooks (remove them when done; the step's wrapper goes with `monkeypatch`)."""
    hooks = [layer.register_forward_hook(lambda module, args, output: on_layer()) for layer in model.layers]
    run = decode_cpu.CpuStepDecoder.run_prompt_chunk

    def counted(self, tokens, start_pos, row, before_layer):
        blocks = self.blocks

        class Counting:  # the extension's Decoder, calling on_layer after each block it runs
            def __getattr__(self, name):
                return getattr(blocks, name)

            def step_rows(self, *args, **kwargs):
                out = blocks.step_rows(*args, **kwargs)
                on_layer()
                return out

        self.blocks = Counting()
        try:
            return run(self, tokens, start_pos, row, before_layer)
        finally:
            self.blocks = blocks

    monkeypatch.setattr(decode_cpu.CpuStepDecoder, "run_prompt_chunk", counted)
    return hooks
