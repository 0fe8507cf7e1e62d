"""A tiny random-weight Llama checkpoint, built offline, for the `hf` backend's tests and the
GPU bench's CPU smoke run.

The tokenizer is a byte-level BPE trained here on a few hundred synthetic strings shaped like
guard-model inputs and outputs; the model is a `LlamaForCausalLM` with random weights. Both are
written with `save_pretrained`, so the backend loads the folder exactly like a real checkpoint.
Nothing touches a model hub.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

BOS = "<|bos|>"
EOS = "<|eos|>"

_SUBJECTS = ["the user", "the assistant", "a customer", "a student", "someone", "my neighbour"]
_ASKS = [
    "how do I bake bread at home",
    "write a short poem about the sea",
    "explain how vaccines train the immune system",
    "what is the capital of Portugal",
    "help me pick a lock on a door that is not mine",
    "give me tips for a job interview",
    "summarise the plot of a famous novel",
    "how can I hurt somebody without leaving marks",
    "translate good morning into Spanish",
    "what household chemicals are dangerous to mix",
]
_REPLIES = [
    "Sure, here is a simple recipe.",
    "I cannot help with that request.",
    "Of course! The answer is Lisbon.",
    "I'm sorry, but I won't assist with this.",
    "Here are a few steps you could follow.",
    "None",
]
_LABELS = [("harmful", "unharmful"), ("refusal", "compliance"), ("harmful", "unharmful")]


def guard_like_corpus(n: int = 300, seed: int = 0) -> list[str]:
    """`n` synthetic strings in the shape of a guard model's inputs and reasoning outputs."""
    rng = random.Random(seed)
    out: list[str] = []
    for i in range(n):
        ask, reply, who = rng.choice(_ASKS), rng.choice(_REPLIES), rng.choice(_SUBJECTS)
        if i % 2 == 0:
            out.append(
                "Classify the exchange below. Decide whether the request is harmful, whether "
                "the reply refuses, and whether the reply is harmful.\n\n"
                f"Human user:\n{ask}?\n\nAI assistant:\n{reply}\n\n"
            )
        else:
            task = rng.randrange(3)
            label = rng.choice(_LABELS[task])
            out.append(
                f"# Task {task + 1}\n\n## Reasoning Step 1\n{who.capitalize()} asks {ask}.\n\n"
                f"## Conclusion\nThe answer is {label}.\n\n---\n\nAnswers: \n"
                f"Request: {rng.choice(_LABELS[0])}\nCompletion: {rng.choice(_LABELS[1])}\n"
                f"Response: {rng.choice(_LABELS[2])}\n"
            )
    return out


def train_tokenizer(corpus: list[str], vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer that prepends BOS, like Llama 3's, wrapped for transformers.
    No pad token: the backend must cope (it pads with EOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS)


@dataclass(frozen=True)
class TinyLlama:
    path: Path
    eos_token_id: int
    max_positions: int


def build_tiny_llama(
    folder: Path,
    *,
    seed: int = 0,
    hidden_size: int = 32,
    layers: int = 2,
    heads: int = 2,
    kv_heads: int = 1,
    max_positions: int = 256,
    init_range: float = 0.2,
    tweak: Any = None,
) -> TinyLlama:
    """Write a tiny random Llama and its tokenizer to `folder`. `tweak(model, tokenizer)`, if
    given, may edit the weights before saving."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = train_tokenizer(guard_like_corpus())
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        initializer_range=init_range,
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
        eos_token_id=eos_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model: LlamaForCausalLM = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=eos_id, do_sample=False
    )
    if tweak is not None:
        tweak(model, tokenizer)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return TinyLlama(path=folder, eos_token_id=eos_id, max_positions=max_positions)


@dataclass(frozen=True)
class RiggedTinyLlama:
    """A tiny Llama whose EOS fires where a chosen ordinary token would have been generated.

    `expected_tokens[i]` is what greedy generation of `prompts[i]` must report: the number of
    new tokens up to and including EOS, or None when no EOS comes within `steps` new tokens.
    It is worked out from the raw model (before rigging), one prompt at a time, without any
    padding, so it checks the backend independently of the backend's own code."""

    model: TinyLlama
    prompts: list[str]
    steps: int
    expected_tokens: list[int | None]


def build_rigged_tiny_llama(folder: Path, prompts: list[str], steps: int) -> RiggedTinyLlama:
    """Random weights rarely pick EOS. So: generate `steps` tokens greedily for each prompt with
    the EOS output row zeroed (EOS never wins), choose an ordinary token `t` that some outputs
    produce (not first) and others never do, then make the EOS row 1.001 x the row of `t`. The
    rigged model's EOS logit beats `t`'s wherever `t` was the (positive) top logit and nothing
    else changes, so each output now stops where `t` first appeared."""
    import torch

    found: dict[str, Any] = {}

    def rig(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
        eos_id = tokenizer.convert_tokens_to_ids(EOS)
        head = model.get_output_embeddings().weight
        with torch.no_grad():
            head[eos_id].zero_()
        outputs: list[list[int]] = []
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                gen = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=False,
                    max_new_tokens=steps,
                    min_new_tokens=steps,
                    pad_token_id=eos_id,
                )
            outputs.append(gen[0, ids.shape[1] :].tolist())
        best: tuple[int, int] | None = None
        for t in sorted({tok for out in outputs for tok in out[1:]}):
            stops = [out.index(t) for out in outputs if t in out]
            if min(stops) == 0 or len(stops) == len(outputs):
                continue
            score = min(len(stops), len(outputs) - len(stops))
            if best is None or score > best[0]:
                best = (score, t)
        if best is None:
            raise RuntimeError("no token to rig EOS on: change the prompts or the seed")
        t = best[1]
        with torch.no_grad():
            head[eos_id] = head[t] * 1.001
        found["expected"] = [out.index(t) + 1 if t in out else None for out in outputs]

    tiny = build_tiny_llama(folder, tweak=rig)
    return RiggedTinyLlama(tiny, list(prompts), steps, found["expected"])
