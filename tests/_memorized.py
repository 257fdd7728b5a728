"""A tiny TL-native model that has memorized random "PII" token strings.

Self-contained, so the core tests need neither the data pipeline nor a tokenizer:
each record is a random token sequence whose positions PII_START..PII_END are the
PII, and the model is trained on the records until greedy decoding reproduces
every PII string from its prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import version

import torch

VOCAB = 256
TL_MAJOR = int(version("transformer-lens").split(".")[0])
SEQ_LEN = 24
PII_START, PII_END = 12, 18


@dataclass
class Memorized:
    model: object
    input_ids: torch.Tensor  # [records, SEQ_LEN]
    pii_mask: torch.Tensor  # [records, SEQ_LEN]

    @property
    def batch(self) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids,
            "attention_mask": torch.ones_like(self.input_ids),
            "pii_mask": self.pii_mask,
        }


def tiny_config(n_layers: int = 2, d_mlp: int = 256, seed: int = 0) -> dict:
    return dict(
        n_layers=n_layers,
        d_model=64,
        n_ctx=64,
        d_head=16,
        n_heads=4,
        d_mlp=d_mlp,
        d_vocab=VOCAB,
        act_fn="gelu",
        normalization_type="LN",
        seed=seed,
    )


def make_tiny_model(n_layers: int = 2, d_mlp: int = 256, seed: int = 0):
    """A randomly initialised TL-native model in eval mode.

    A TransformerLens 4 ``TransformerBridge`` where TL 4 is installed, else a
    TransformerLens 3 ``HookedTransformer``, so the same tests run on both. TL 3.9
    ships an early ``TransformerBridge`` too, but users pinned to TL 3 (SAELens, for
    example) work with ``HookedTransformer``, so that is what TL 3 tests get.
    """
    config = tiny_config(n_layers=n_layers, d_mlp=d_mlp, seed=seed)
    if TL_MAJOR < 4:
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        return HookedTransformer(HookedTransformerConfig(**config)).eval()
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_native(config).eval()


def build_memorized(
    n_records: int = 32,
    steps: int = 400,
    seed: int = 0,
    d_mlp: int = 256,
    lr: float = 3e-3,
    mlp_only: bool = False,
) -> Memorized:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (n_records, SEQ_LEN), generator=generator)
    pii_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    pii_mask[:, PII_START:PII_END] = True

    model = make_tiny_model(d_mlp=d_mlp, seed=seed)
    torch.manual_seed(seed)
    params = [p for n, p in model.named_parameters() if "mlp" in n or not mlp_only]
    optimizer = torch.optim.Adam(params, lr=lr)
    model.train()
    for _ in range(steps):
        logits = model(input_ids, return_type="logits")
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, VOCAB), input_ids[:, 1:].reshape(-1)
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    for param in model.parameters():
        param.requires_grad_(True)
    return Memorized(model=model, input_ids=input_ids, pii_mask=pii_mask)


def extraction_rate(model, input_ids: torch.Tensor, fwd_hooks=()) -> float:
    """Fraction of records whose whole PII string greedy decoding reproduces from its prefix."""
    generated = input_ids[:, :PII_START]
    with torch.no_grad(), model.hooks(fwd_hooks=list(fwd_hooks)):
        for _ in range(PII_END - PII_START):
            logits = model(generated, return_type="logits")
            generated = torch.cat([generated, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    hits = (generated[:, PII_START:PII_END] == input_ids[:, PII_START:PII_END]).all(dim=1)
    return hits.float().mean().item()


def non_pii_accuracy(model, input_ids: torch.Tensor, pii_mask: torch.Tensor, fwd_hooks=()) -> float:
    """Teacher-forced next-token accuracy on the non-PII tokens."""
    with torch.no_grad():
        logits = model.run_with_hooks(input_ids, fwd_hooks=list(fwd_hooks), return_type="logits")
    correct = logits[:, :-1].argmax(-1) == input_ids[:, 1:]
    keep = ~pii_mask[:, 1:]
    return correct[keep].float().mean().item()
