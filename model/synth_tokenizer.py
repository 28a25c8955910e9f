"""Synthetic tokenizers for tests and demos: a small byte-level BPE trained on a generated corpus,
with the 2048 Llama 4 special tokens and the Llama 4 chat template, written in the Hugging Face
format. Never used at serving time."""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as _Backend

from model.errors import InvalidInputError, TokenizerError
from model.tokenizer import BOS, LLAMA4_SPECIAL_TOKENS, LLAMA4_SPLIT_PATTERN, PAD, Tokenizer

LLAMA4_CHAT_TEMPLATE = (
    '{{- bos_token }}\n{%- if custom_tools is defined %}\n    {%- set tools = custom_tools %}\n{%- endif %}\n'
    '{%- if not tools_in_user_message is defined %}\n    {%- set tools_in_user_message = true %}\n{%- endif %}\n'
    '{%- if not date_string is defined %}\n    {%- if strftime_now is defined %}\n'
    '        {%- set date_string = strftime_now("%d %b %Y") %}\n    {%- else %}\n'
    '        {%- set date_string = "26 Jul 2024" %}\n    {%- endif %}\n{%- endif %}\n'
    '{%- if not tools is defined %}\n    {%- set tools = none %}\n{%- endif %}\n\n'
    '{#- This block extracts the system message, so we can slot it into the right place. #}\n'
    "{%- if messages[0]['role'] == 'system' %}    \n    {%- if messages[0]['content'] is string %}\n"
    "        {%- set system_message = messages[0]['content']|trim %}\n    {%- else %}\n"
    '        {#- FIXME: The processor requires an array, always. #}\n'
    "        {%- set system_message = messages[0]['content'][0]['text']|trim %}\n    {%- endif %}\n"
    '    {%- set messages = messages[1:] %}\n    {%- set user_supplied_system_message = true %}\n{%- else %}\n'
    '    {%- set system_message = "" %}\n    {%- set user_supplied_system_message = false %}\n{%- endif %}\n\n'
    '{#- System message if the user supplied one #}\n{%- if user_supplied_system_message %}\n'
    '    {{- "<|header_start|>system<|header_end|>\n\n" }}\n    {%- if tools is not none %}\n'
    '        {{- "Environment: ipython\n" }}\n    {%- endif %}\n'
    '    {%- if tools is not none and not tools_in_user_message %}\n'
    '        {{- "You have access to the following functions. '
    'To call a function, please respond with JSON for a function call." }}\n'
    '        {{- \'Respond in the format {"name": function name, '
    '"parameters": dictionary of argument name and its value}.\' }}\n'
    '        {{- "Do not use variables.\n\n" }}\n        {%- for t in tools %}\n'
    '            {{- t | tojson(indent=4) }}\n            {{- "\n\n" }}\n        {%- endfor %}\n    {%- endif %}\n'
    '    {{- system_message }}\n    {{- "<|eot|>" }}\n{%- endif %}\n\n'
    '{#- Custom tools are passed in a user message with some extra guidance #}\n'
    '{%- if tools_in_user_message and not tools is none %}\n'
    '    {#- Extract the first user message so we can plug it in here #}\n    {%- if messages | length != 0 %}\n'
    "        {%- set first_user_message = messages[0]['content']|trim %}\n"
    '        {%- set messages = messages[1:] %}\n    {%- else %}\n'
    '        {{- raise_exception("Cannot put tools in the first user message '
    'when there\'s no first user message!") }}\n'
    "{%- endif %}\n    {{- '<|header_start|>user<|header_end|>\n\n' -}}\n"
    '    {{- "Given the following functions, please respond with a JSON for a function call " }}\n'
    '    {{- "with its proper arguments that best answers the given prompt.\n\n" }}\n'
    '    {{- \'Respond in the format {"name": function name, '
    '"parameters": dictionary of argument name and its value}.\' }}\n'
    '    {{- "Do not use variables.\n\n" }}\n    {%- for t in tools %}\n        {{- t | tojson(indent=4) }}\n'
    '        {{- "\n\n" }}\n    {%- endfor %}\n    {{- first_user_message + "<|eot|>"}}\n{%- endif %}\n\n'
    '{%- for message in messages %}\n'
    "    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}\n"
    "    {{- '<|header_start|>' + message['role'] + '<|header_end|>\n\n' }}\n"
    "        {%- if message['content'] is string %}\n            {{- message['content'] }}\n        {%- else %}\n"
    "            {%- for content in message['content'] %}\n                {%- if content['type'] == 'image' %}\n"
    "                    {{- '<|image|>' }}\n                {%- elif content['type'] == 'text' %}\n"
    "                    {{- content['text'] }}\n                {%- endif %}\n            {%- endfor %}\n"
    '        {%- endif %}\n        {{- "<|eot|>" }}\n'
    "    {%- elif 'tool_calls' in message and message.tool_calls|length > 0 %}\n"
    "       {{- '<|header_start|>assistant<|header_end|>\n\n' -}}\n       {{- '<|python_start|>' }}\n"
    "        {%- if message['content'] is string %}\n            {{- message['content'] }}\n        {%- else %}\n"
    "            {%- for content in message['content'] %}\n                {%- if content['type'] == 'image' %}\n"
    "                    {{- '<|image|>' }}\n                {%- elif content['type'] == 'text' %}\n"
    "                    {{- content['text'] }}\n                {%- endif %}\n            {%- endfor %}\n"
    "        {%- endif %}\n       {{- '<|python_end|>' }}\n        {%- for tool_call in message.tool_calls %}\n"
    '           {{- \'{"name": "\' + tool_call.function.name + \'", \' }}\n           {{- \'"parameters": \' }}\n'
    '           {{- tool_call.function.arguments | tojson }}\n           {{- "}" }}\n        {%- endfor %}\n'
    '       {{- "<|eot|>" }}\n    {%- elif message.role == "tool" or message.role == "ipython" %}\n'
    '        {{- "<|header_start|>ipython<|header_end|>\n\n" }}\n'
    '        {%- if message.content is mapping or message.content is iterable %}\n'
    '            {{- message.content | tojson }}\n        {%- else %}\n            {{- message.content }}\n'
    '        {%- endif %}\n        {{- "<|eot|>" }}\n    {%- endif %}\n{%- endfor %}\n'
    "{%- if add_generation_prompt %}\n    {{- '<|header_start|>assistant<|header_end|>\n\n' }}\n{%- endif %}\n"
)
"""The Llama 4 chat template (jinja), as shipped in transformers' `processing_llama4.py`; it is data
written into synthetic checkpoints' `tokenizer_config.json`, never executed by Herd."""


_WORDS = (
    "the of and to in a is that for it as was with be by on not he I this are or his from at which but "
    "have an they you were her she there been one all we their has would when if so no will can more "
    "model token server request image expert router cache people time year way day thing man world life "
    "hand part child eye woman place work week case point number group problem fact good new first last "
    "long great little own other old right big high different small large next early young important"
).split()
_EXTRA = ["don't", "it's", "we're", "I'll", "you've", "café", "naïve", "日本語", "東京", "привет", "😀", "🚀"]


def synthetic_corpus(seed: int = 0, sentences: int = 300) -> str:
    """A deterministic English-ish training text (a few KB) for synthetic tokenizers."""
    rng = random.Random(seed)
    lines = []
    for _ in range(sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 12))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), rng.choice(_EXTRA))
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 99999)))
        sentence = " ".join(words)
        lines.append(sentence[0].upper() + sentence[1:] + rng.choice([".", ".", "?", "!", ",", ";"]))
    return "\n".join(lines) + "\n"


def _build_backend(num_merges: int, seed: int) -> _Backend:
    backend = _Backend(models.BPE(unk_token=None, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA4_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=256 + num_merges, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(synthetic_corpus(seed).splitlines(keepends=True), trainer=trainer)
    base = backend.get_vocab_size(with_added_tokens=True)
    if base != 256 + num_merges:
        raise TokenizerError(f"synthetic corpus gave {base - 256} merges, fewer than the {num_merges} asked for")
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA4_SPECIAL_TOKENS])
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, base)])
    return backend


def write_synthetic_tokenizer(out_dir: str | Path, *, num_merges: int = 256, seed: int = 0) -> Tokenizer:
    """Train a small byte-level BPE with the Llama 4 layout and write it in the Hugging Face format.

    Files: `tokenizer.json`, `tokenizer_config.json` (with the Llama 4 chat template),
    `special_tokens_map.json`. Vocab: 256 bytes + `num_merges` merges + 2048 special tokens.
    """
    if num_merges < 0:
        raise InvalidInputError(f"num_merges must be >= 0, got {num_merges}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    backend = _build_backend(num_merges, seed)
    backend.save(str(out / "tokenizer.json"))
    names = {"bos_token": BOS, "eos_token": "<|eot|>", "pad_token": PAD}
    config = {**names, "chat_template": LLAMA4_CHAT_TEMPLATE, "model_max_length": 131072,
              "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "model_input_names": ["input_ids", "attention_mask"], "padding_side": "left"}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(names, indent=2) + "\n")
    return Tokenizer.from_dir(out)
