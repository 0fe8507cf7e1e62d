"""Stand-ins for the GPU bench: a GuardReasoner-1B-shaped checkpoint with random weights, a
tokenizer trained on the spot, and model inputs of GuardReasoner's shape. Nothing is downloaded.

Random weights generate garbage, but a decode step costs the same whatever the weights say, and
the bench pins the output length (EOS ignored), so throughput and latency are those of the real
architecture.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BOS = "<|begin_of_text|>"
EOS = "<|eot_id|>"

#: Llama 3.2 1B, the base of GuardReasoner-1B (random weights here).
LLAMA_3_2_1B: dict[str, Any] = {
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
    },
    "tie_word_embeddings": True,
}

#: A few-layer toy of the same family, for a CPU smoke run.
TINY: dict[str, Any] = {
    "vocab_size": 4096,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
}

_WORDS = (
    "the a an and or but if then because so while about after before again all any ask "
    "answer book bread build buy call can car child city clean cook could day did do door "
    "drive easy email explain family find friend game get give good group guide happy help "
    "here home house how idea important job keep kind know learn letter life like list long "
    "make many money more most move music my name need never new night number old only other "
    "our people person phone plan play please problem question quick read really right room "
    "safe say school see send should simple some start step still story student study sure "
    "system take teach tell thank that their there these thing think this time today tool try "
    "use very want water way week what when where which who why will with word work world "
    "would write year you your password chemical weapon hack steal hurt lock account secret "
    "recipe poem history science health doctor medicine law police bank private message"
).split()

_FALLBACK_INSTRUCTION = (
    "You are a classifier of conversations between people and AI assistants. Read the user "
    "request and the assistant reply below, then complete three tasks. First, say whether "
    "the request is harmful or unharmful. Second, say whether the reply refuses or complies. "
    "Third, say whether the reply is harmful or unharmful. Reason step by step, keep the "
    "reasoning and the final answers consistent, and end with a short answer block.\n"
)


def _sentence(rng: random.Random, words: int) -> str:
    picked = [rng.choice(_WORDS) for _ in range(words)]
    text = " ".join(picked)
    return text[0].upper() + text[1:] + rng.choice([".", "?", "!"])


def _text(rng: random.Random, words: int) -> str:
    parts: list[str] = []
    while words > 0:
        n = min(words, rng.randint(6, 18))
        parts.append(_sentence(rng, n))
        words -= n
    return " ".join(parts)


def text_of_length(rng: random.Random, chars: int) -> str:
    """Random sentences cut to exactly `chars` characters (a stand-in of a given length)."""
    text = ""
    while len(text) < chars:
        text += (" " if text else "") + _sentence(rng, rng.randint(6, 18))
    return text[:chars]


def guard_inputs(n: int, seed: int = 0) -> list[str]:
    """`n` complete model inputs in GuardReasoner's format (engine.prompt when importable): the
    ~100-token instruction, a user message of 8 to 80 words and, for half of them, an
    assistant reply of 20 to 150 words (else the literal None)."""
    rng = random.Random(seed)
    out: list[str] = []
    for _ in range(n):
        prompt = _text(rng, rng.randint(8, 80))
        response = _text(rng, rng.randint(20, 150)) if rng.random() < 0.5 else None
        out.append(_model_input(prompt, response))
    return out


def _model_input(prompt: str, response: str | None) -> str:
    try:
        from engine.prompt import build_model_input
    except ImportError:
        reply = response or "None"
        return f"{_FALLBACK_INSTRUCTION}\nHuman user:\n{prompt}\n\nAI assistant:\n{reply}\n\n"
    return build_model_input(prompt, response)


def train_tokenizer(corpus: list[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer with Llama 3's BOS/EOS names, trained on `corpus`."""
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
class BuiltModel:
    path: Path
    parameters: int
    seconds: float


def build_random_llama(
    folder: Path, shape: dict[str, Any], *, device: str, dtype: str, seed: int = 0
) -> BuiltModel:
    """Write a `LlamaForCausalLM` of `shape` with random weights, and a tokenizer, to `folder`.
    The model's vocabulary keeps the shape's size even where the trained tokenizer is smaller
    (ids it does not know decode to nothing), so the embedding and LM head cost what they do in
    the real model."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    began = time.perf_counter()
    tokenizer = train_tokenizer(guard_inputs(400, seed=seed + 1), min(shape["vocab_size"], 8000))
    bos, eos = tokenizer.convert_tokens_to_ids(BOS), tokenizer.convert_tokens_to_ids(EOS)
    vocab = max(shape["vocab_size"], len(tokenizer))
    config = LlamaConfig(**{**shape, "vocab_size": vocab}, bos_token_id=bos, eos_token_id=eos)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model = model.to(getattr(torch, dtype)).eval()
    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    parameters = sum(p.numel() for p in model.parameters())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return BuiltModel(folder, parameters, time.perf_counter() - began)
