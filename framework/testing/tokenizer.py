"""A small byte-level BPE tokenizer trained locally, for tests.

`make_tokenizer()` trains a byte-level BPE (vocabulary of about 512) on a
built-in English corpus with the `tokenizers` library, so tests never
download a tokenizer. Byte-level means every string, in any script,
round-trips: ``decode(encode(x), skip_special_tokens=True) == x``. (One
exception: transformers 5 loads a qwen2 directory as Qwen2Tokenizer, which
adds NFC normalisation, so there decomposed Unicode comes back composed.)

Special tokens (fixed ids, in this order):

    0 <s>            bos, prepended by encode() like Llama
    1 </s>           eos, also ends every chat turn
    2 <pad>
    3 <|system|>     chat role markers
    4 <|user|>
    5 <|assistant|>

The chat template renders ``<s>`` once, then each message as
``<|role|>\\n{content}</s>\\n``; ``add_generation_prompt`` appends
``<|assistant|>\\n``. As with Llama 3, the template holds the bos, so a
rendered chat must be encoded with ``add_special_tokens=False``
(``apply_chat_template(tokenize=True)`` does that).
"""

from __future__ import annotations

import functools
import itertools
import json
import os
from pathlib import Path

VOCAB_SIZE = 512
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (BOS, EOS, PAD) + ROLE_MARKERS  # ids 0..5 in this order

# Split text as Qwen2 / Llama 3 do (words, single digits, punctuation runs,
# whitespace) before the byte-level mapping. transformers 5 rebuilds the
# pipeline of a qwen2 checkpoint with exactly this split (plus NFC), so the
# same split everywhere keeps token ids equal across architectures.
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

_SENTENCES = """\
The quick brown fox jumps over the lazy dog.
Once upon a time, there was a little girl who lived in a village near the forest.
Whenever she went out, the little girl wore a red riding cloak.
It was the best of times, it was the worst of times.
Call me Ishmael. Some years ago, never mind how long precisely, I went to sea.
All happy families are alike; each unhappy family is unhappy in its own way.
The sun rose slowly over the hills, and the morning light filled the valley.
A language model predicts the next token given the tokens that came before it.
The engine schedules requests, runs the model, and samples the next tokens.
Paged attention stores keys and values in fixed-size blocks of memory.
Continuous batching lets new requests join while others are still decoding.
What is the capital of France? The capital of France is Paris.
How many days are there in a week? There are seven days in a week.
Please write a short poem about the sea and the stars.
Thank you for your help! You are welcome, have a nice day.
Can you explain how a computer works in simple words?
The weather today is sunny with a light breeze from the west.
I would like a cup of tea with milk and no sugar, please.
She opened the door, looked outside, and smiled at the rain.
In 1969, two astronauts walked on the Moon for the first time.
The train leaves at 9:45 and arrives at 12:30, platform 3.
Water boils at 100 degrees Celsius at sea level.
def add(a, b):
    return a + b
for i in range(10):
    print(i * i)
{"name": "Alice", "age": 30, "city": "London"}
Hello, world! Hello again, world? Yes: hello.
"""

_SUBJECTS = ("The cat", "A young student", "My friend", "The old man", "Our team",
             "The small robot", "Every teacher", "The doctor", "A bird", "The children")
_VERBS = ("reads", "writes", "finds", "likes", "builds", "sees", "carries",
          "remembers", "paints", "follows")
_OBJECTS = ("a long book", "the green door", "an answer", "the river", "a new house",
            "the quiet street", "some bread", "the last letter", "a bright star",
            "the morning news")
_ENDINGS = (".", " today.", " every day.", " again!", " in the evening.", "?")


def training_corpus() -> list[str]:
    """The built-in training text: fixed sentences plus 300 generated ones.

    Deterministic (no randomness), so the trained tokenizer is too.
    """
    lines = _SENTENCES.splitlines()
    combos = itertools.product(_SUBJECTS, _VERBS, _OBJECTS, _ENDINGS)
    # Stride through the 6,000 combinations to get 300 varied lines.
    generated = [f"{s} {v} {o}{e}" for s, v, o, e in itertools.islice(combos, 0, None, 20)]
    numbers = [f"{n} plus {n + 1} is {2 * n + 1}." for n in range(0, 100, 7)]
    return lines + generated + numbers


@functools.lru_cache(maxsize=1)
def _trained_tokenizer_json() -> str:
    """Train the BPE once per process; return it serialised (tokenizer.json)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_corpus(), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tok.to_str()


def make_tokenizer(path: str | os.PathLike | None = None):
    """Return the test tokenizer, trained locally; optionally save it.

    Training happens once per process; each call returns a fresh
    `transformers.PreTrainedTokenizerFast`, so callers may mutate theirs.

    Args:
        path: if given, the tokenizer is saved there with `save_pretrained`
            (tokenizer.json, tokenizer_config.json with the chat template,
            special tokens map), loadable with `AutoTokenizer`.

    Returns:
        A `transformers.PreTrainedTokenizerFast`.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json()),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_MARKERS),
        clean_up_tokenization_spaces=False,  # keep decode an exact inverse
        model_max_length=2048,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    if path is not None:
        save_tokenizer(tokenizer, path)
    return tokenizer


def save_tokenizer(tokenizer, path: str | os.PathLike) -> None:
    """`save_pretrained`, with tokenizer_config.json readable by any version.

    transformers 5 names the class "TokenizersBackend", which 4.x cannot
    load; "PreTrainedTokenizerFast" loads in both. Recent versions write the
    chat template to chat_template.jinja, older ones read it only from
    tokenizer_config.json, so it is kept in both. `unk_token` is written as
    null because transformers 5 loads a qwen2 directory as Qwen2Tokenizer,
    which otherwise adds an "<|endoftext|>" unk beyond the model's vocabulary.
    """
    path = Path(path)
    tokenizer.save_pretrained(path)
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["chat_template"] = CHAT_TEMPLATE
    config["unk_token"] = None
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
