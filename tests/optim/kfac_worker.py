"""Tiny float64 Llama and data for tests/optim/test_kfac.py, and its 2-process worker.

Run as ``python kfac_worker.py --rank R --world 2 --store FILE --out FILE``: joins a gloo process group
(file:// rendezvous), fits EK-FAC on this rank's share of `SEQUENCES` (rank 0 holds 12 loss tokens, rank 1
holds 2, so a mean of per-process means would differ from the global mean) with ``fisher="exact"`` and
``"empirical"`` (both deterministic, so the result can be compared with one process exactly), and saves the
state dicts. The test imports the same builders for its single-process reference.
"""

from __future__ import annotations

import argparse
import types

import torch

VOCAB = 11
PAD = 0
# (token ids, prompt length): labels are -100 on the prompt, so a row of n ids has n - prompt loss tokens.
SEQUENCES = [([3, 5, 7, 2, 9, 4], 2), ([1, 8, 6, 10, 2], 3), ([4, 4, 9, 1, 7, 3, 5], 1), ([2, 6, 3, 8, 10, 1], 2)]
RANK_ROWS = {0: [0, 1, 2], 1: [3]}
FISHERS = ("exact", "empirical")


def _rms_norm_float64(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def tiny_llama64(*, vocab: int = VOCAB, hidden: int = 8, layers: int = 2, seed: int = 0) -> torch.nn.Module:
    """A 2-layer Llama computing in float64 throughout, with a tiny vocabulary (exact Fisher expectations stay
    cheap), tied embeddings and weights large enough for non-uniform predictions. Every factor is at most
    8 x 8, so the 16 loss tokens of `SEQUENCES` (10 distinct input tokens) make them full rank: EK-FAC's
    eigenbasis, hence its operator, is then unique (a degenerate eigenspace would leave it arbitrary).

    HF's eager attention takes its softmax in float32 and LlamaRMSNorm normalises in float32 even in a float64
    model; the oracles need a backward that is linear to float64 rounding (Σ_c of the per-class gradients
    equals Jᵀ(Σ_c weights) to ~1e-16, not ~1e-8), so attention runs through SDPA (float64 on CPU) and the norms
    through a float64 copy of RMSNorm's formula.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                         tie_word_embeddings=True, initializer_range=0.4, pad_token_id=PAD, bos_token_id=1,
                         eos_token_id=2, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).double().eval()
    for module in model.modules():
        if type(module).__name__ == "LlamaRMSNorm":
            module.forward = types.MethodType(_rms_norm_float64, module)
    return model


def make_batch(rows: list[tuple[list[int], int]], *, length: int | None = None,
               pad_ids: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Right-padded batch; padding positions (attention 0, label -100) hold `pad_ids` (cycled) or PAD."""
    length = length or max(len(ids) for ids, _ in rows)
    ids_out, att_out, lab_out = [], [], []
    for ids, prompt in rows:
        pad = [(pad_ids or [PAD])[i % len(pad_ids or [PAD])] for i in range(length - len(ids))]
        ids_out.append(ids + pad)
        att_out.append([1] * len(ids) + [0] * len(pad))
        lab_out.append([-100] * prompt + ids[prompt:] + [-100] * len(pad))
    return {"input_ids": torch.tensor(ids_out), "attention_mask": torch.tensor(att_out),
            "labels": torch.tensor(lab_out)}


def fit_states(rows: list[int]) -> dict[str, dict]:
    from soul.optim.kfac import fit_kfac

    model = tiny_llama64()
    batch = make_batch([SEQUENCES[i] for i in rows])
    return {f: fit_kfac(model, [batch], kind="ekfac", fisher=f).state_dict() for f in FISHERS}


def main() -> None:
    import torch.distributed as dist

    parser = argparse.ArgumentParser()
    for name in ("--rank", "--world"):
        parser.add_argument(name, type=int, required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{args.store}", rank=args.rank, world_size=args.world)
    try:
        states = fit_states(RANK_ROWS[args.rank])
    finally:
        dist.destroy_process_group()
    torch.save(states, args.out)


if __name__ == "__main__":
    main()
