"""Tokenizer, StreamDecoder and chat templates against transformers (the reference implementation).

transformers builds its own tokenizer from the same GGUF metadata (AutoTokenizer.from_pretrained with
gguf_file=...) and renders chat templates with its own apply_chat_template; ours must agree exactly.
"""

from __future__ import annotations

import json
import random

import pytest

from llmcli.errors import UserError
from llmcli.tokenizer import load_tokenizer
from llmcli.tokenizer.chat_template import render_chat_template
from llmcli.tokenizer.stream import StreamDecoder

CORPUS = [
    "Hello world",
    "What is the capital of France?",
    "x 123 4567 a1b2 3.14159 1,000,000 2024-11-23",
    "  two  spaces\n\n\ttabs\r\n  trailing   ",
    "café naïve façade Ωmega Ελληνικά русский عربى עברית",
    "😀 🇫🇷 👨‍👩‍👧 🤖🦀 ✨",
    "日本語のテキスト 中文 한국어",
    "def f(x):\n    return {'a': x ** 2}  # comment\n",
    "<|im_start|>user\nhi<|im_end|>\n",
    "<|endoftext|>text<|endoftext|> <repo_name>",
    "I'm you'll DON'T it's",
    "a" * 64,
    "     ",
    "",
    "\u00a0nbsp\u200bzero-width",
    "e\u0301 (combining) vs \u00e9",
    "C:\\path\\to\\file.txt",
    "<html><body>&amp; &lt;tag&gt;</body></html>",
    "\n",
    "       leading",
    "0000000000",
    "$$\\int_0^1 x\\,dx$$",
]

MESSAGES = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi 😀"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Count: 1 2 3"},
    ],
]


@pytest.fixture(scope="session")
def ours(smollm2_gguf):
    return load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="session")
def ref(smollm2_gguf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


# ---- GGUF tokenizer vs transformers -------------------------------------------------------------------


@pytest.mark.parametrize("add_special", [True, False])
def test_gguf_encode_matches_transformers(ours, ref, add_special):
    for text in CORPUS:
        assert ours.encode(text, add_special_tokens=add_special) == ref.encode(text, add_special_tokens=add_special), (
            text
        )


def test_gguf_decode_matches_transformers(ours, ref):
    rng = random.Random(0)
    for text in CORPUS:
        ids = ref.encode(text)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), text
    for _ in range(20):  # arbitrary id sequences, including ones that split characters
        ids = [rng.randrange(ref.vocab_size) for _ in range(rng.randrange(1, 30))]
        assert ours.decode(ids) == ref.decode(ids)


def test_gguf_special_tokens(ours, ref, smollm2_gguf):
    from llmcli.formats.gguf_reader import open_gguf

    r = open_gguf(smollm2_gguf)  # the gguf package's reader (cached: it takes seconds to parse)
    eos_id = int(r.fields["tokenizer.ggml.eos_token_id"].contents())
    assert ours.special_tokens_map == ref.special_tokens_map
    assert ours.bos_token_id == ref.bos_token_id and ours.eos_token_id == ref.eos_token_id == eos_id
    assert eos_id in ours.eos_token_ids
    assert ours.add_bos_token is bool(r.fields["tokenizer.ggml.add_bos_token"].contents())
    assert ours.vocab_size == len(ref)
    assert ours.chat_template == ref.chat_template


@pytest.mark.parametrize("messages", MESSAGES)
@pytest.mark.parametrize("gen", [True, False])
def test_gguf_chat_matches_transformers(ours, ref, messages, gen):
    text = ours.apply_chat_template(messages, add_generation_prompt=gen)
    assert text == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    want = ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen, return_dict=True)["input_ids"]
    assert ours.encode_chat(messages, add_generation_prompt=gen) == want


# ---- tokenizer directories ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def saved_dir(ref, tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    ref.save_pretrained(d)
    return d


def _auto(d):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(d)


def test_dir_matches_transformers(saved_dir):
    ours, ref = load_tokenizer(saved_dir), _auto(saved_dir)
    for text in CORPUS:
        assert ours.encode(text) == ref.encode(text), text
        assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
    for m in MESSAGES:
        assert ours.apply_chat_template(m) == ref.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
    assert ours.special_tokens_map == ref.special_tokens_map


def _copy_dir(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        if f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize(
    "add_bos,add_eos,post_processor", [(True, False, True), (True, True, False), (False, True, False)]
)
def test_dir_add_bos_eos_like_transformers(saved_dir, tmp_path, add_bos, add_eos, post_processor):
    d = _copy_dir(saved_dir, tmp_path / "t")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.update(add_bos_token=add_bos, add_eos_token=add_eos)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tj = json.loads((d / "tokenizer.json").read_text())
    if post_processor:  # a Llama-style post-processor that prepends BOS itself
        bos = cfg["bos_token"]
        tj["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [1], "tokens": [bos]}},
        }
    else:
        tj["post_processor"] = None
    (d / "tokenizer.json").write_text(json.dumps(tj))
    ours, ref = load_tokenizer(d), _auto(d)
    for text in CORPUS[:6]:
        assert ours.encode(text) == ref.encode(text), text
    assert ours.add_bos_token is (ref.encode("a")[0] == ref.bos_token_id)
    # Chat ids never get a second BOS: the template writes its own, as transformers encodes it.
    m = MESSAGES[1]
    want = ref.apply_chat_template(m, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ours.encode_chat(m) == want


def test_dir_template_precedence_and_eos_ids(saved_dir, tmp_path):
    d = _copy_dir(saved_dir, tmp_path / "t")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    cfg["chat_template"] = [
        {"name": "default", "template": "D{{ messages[0]['content'] }}"},
        {"name": "tool_use", "template": "T{{ tools | length }}"},
    ]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "chat_template.jinja").unlink(missing_ok=True)
    ours = load_tokenizer(d)
    m = [{"role": "user", "content": "x"}]
    assert ours.apply_chat_template(m) == "Dx"
    assert ours.apply_chat_template(m, tools=[{"a": 1}, {"b": 2}]) == "T2"
    (d / "chat_template.jinja").write_text("J{{ messages | length }}")
    assert load_tokenizer(d).apply_chat_template(m) == _auto(d).apply_chat_template(m, tokenize=False) == "J1"

    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    (d / "config.json").write_text(json.dumps({"eos_token_id": 11, "model_type": "llama"}))
    eos = load_tokenizer(d).eos_token_ids
    assert eos == {
        7,
        9,
        11,
        ours.token_to_id(cfg["eos_token"] if isinstance(cfg["eos_token"], str) else cfg["eos_token"]["content"]),
    }


def test_dir_errors(tmp_path):
    with pytest.raises(UserError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError):
        load_tokenizer(tmp_path)


# ---- streaming ----------------------------------------------------------------------------------------------


def _stream(tok, ids, skip=False):
    sd = StreamDecoder(tok, skip_special_tokens=skip)
    deltas = [sd.push(i) for i in ids]
    return deltas, sd.flush()


def test_stream_decoder_reassembles_text(ours):
    for text in CORPUS + ["".join(CORPUS)]:
        ids = ours.encode(text)
        for skip in (False, True):
            deltas, tail = _stream(ours, ids, skip)
            assert "".join(deltas) + tail == ours.decode(ids, skip_special_tokens=skip), text
            assert not any("\ufffd" in d for d in deltas)  # never half a character


def test_stream_decoder_holds_split_characters(ours):
    ids = ours.encode(" 😀")  # one emoji split over byte-level tokens
    assert len(ids) >= 2
    deltas, tail = _stream(ours, ids)
    assert deltas[:-1] == [""] * (len(ids) - 1) and deltas[-1] == " 😀" and tail == ""
    cjk = ours.encode("語")
    deltas, tail = _stream(ours, cjk)
    assert "".join(deltas) == "語" and len(cjk) > 1


def test_stream_decoder_random_ids_and_invalid_tail(ours):
    rng = random.Random(1)
    for _ in range(30):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randrange(1, 40))]
        deltas, tail = _stream(ours, ids)
        assert "".join(deltas) + tail == ours.decode(ids)
    # A lone UTF-8 lead byte never completes: it is held, then flushed as U+FFFD like decode() gives it.
    lead = ours.encode("😀")[0]
    deltas, tail = _stream(ours, [ours.encode("ok")[0], lead])
    assert deltas[-1] == "" and "".join(deltas) + tail == ours.decode([ours.encode("ok")[0], lead])


# ---- chat templates vs transformers' renderer ---------------------------------------------------------------

LLAMA3 = r"""{{- bos_token }}
{%- if custom_tools is defined %}{%- set tools = custom_tools %}{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}{%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}{%- set date_string = "26 Jul 2024" %}{%- endif %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}{%- set messages = messages[1:] %}
{%- else %}{%- set system_message = "" %}{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none %}
    {{- "You have access to the following functions:\n\n" }}
    {%- for t in tools %}{{- t | tojson(indent=4) }}{{- "\n\n" }}{%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message.role not in ['user', 'assistant', 'tool'] %}
        {{- raise_exception("Unknown role: " + message.role) }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}
"""

QWEN25 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}
    {%- else %}{{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}{%- endif %}
    {{- "\n\n# Tools\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}{{- "\n" }}{{- tool | tojson }}{%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}{{- '\n' + message.content }}{%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}{{- tool_call.arguments | tojson }}{{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\n<tool_response>\n' }}{{- message.content }}{{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}{{- '<|im_end|>\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}
"""  # noqa: E501 (a real template, verbatim)

GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# Whitespace control (trim_blocks/lstrip_blocks), loop controls, namespace, documents, HTML-safe tojson.
MISC = """{% set ns = namespace(n=0) %}
{% for m in messages %}
    {% if m.role == 'skip' %}{% continue %}{% endif %}
    {% set ns.n = ns.n + 1 %}
    <{{ m.role }}>{{ m.content | tojson }}</{{ m.role }}>
    {% if ns.n >= 3 %}{% break %}{% endif %}
{% endfor %}
{% if documents %}{% for d in documents %}[{{ d.title }}] {{ d | tojson(indent=2, sort_keys=True) }}
{% endfor %}{% endif %}
count={{ ns.n }} extra={{ extra_flag | default('none') }}{{ eos_token }}
"""

# Qwen3-style reasoning, and a {% generation %} block (training-mask marker some templates carry).
REASONING = """{%- for m in messages %}
<|im_start|>{{ m.role }}
{%- if m.role == 'assistant' and m.reasoning_content is defined %}
<think>{{ m.reasoning_content }}</think>{% endif %}
{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}<|im_end|>
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and not enable_thinking %}<think>

</think>
{% endif %}{% endif %}"""  # noqa: E501 (a real template, verbatim)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather <b>now</b> & 'later' in 東京",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there  "}],
    [
        {"role": "system", "content": " Be brief. "},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "assistant", "content": "21 °C"},
        {"role": "user", "content": "Thanks 😀"},
    ],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b <&>"}, {"role": "user", "content": "c"}],
    [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning": "Add them."},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6", "thinking": "Again."},
    ],
]


def _ref_render(ref, template, messages, **kw):
    return ref.apply_chat_template(messages, chat_template=template, tokenize=False, **kw)


@pytest.mark.parametrize(
    "template",
    [LLAMA3, QWEN25, GEMMA, MISTRAL, MISC, REASONING],
    ids=["llama3", "qwen25", "gemma", "mistral", "misc", "reasoning"],
)
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("gen", [True, False])
def test_templates_match_transformers(ref, template, conv, gen):
    messages = CONVERSATIONS[conv]
    kw: dict = dict(add_generation_prompt=gen)
    if template in (QWEN25, LLAMA3) and conv == 1:
        kw["tools"] = TOOLS
    if template is MISC:
        kw.update(documents=[{"title": "T<1>", "text": "ünï & <x>"}], extra_flag=True)
    if template is REASONING and conv == 3:
        kw["enable_thinking"] = False
    special = dict(ref.special_tokens_map)
    try:
        want = _ref_render(ref, template, messages, **kw)
    except Exception as e:  # the template rejects this conversation: we must reject it too, with its message
        with pytest.raises(UserError) as ours_err:
            render_chat_template(template, messages, special_tokens=special, **kw)
        assert str(e) in str(ours_err.value) and "\n" not in str(ours_err.value)
        return
    assert render_chat_template(template, messages, special_tokens=special, **kw) == want


def test_gemma_system_role_is_a_user_error():
    with pytest.raises(UserError, match="System role not supported"):
        render_chat_template(
            GEMMA,
            [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}],
            special_tokens={"bos_token": "<bos>"},
        )


def test_template_errors_are_user_errors():
    with pytest.raises(UserError, match="syntax error"):
        render_chat_template("{% for m in messages %}", [{"role": "user", "content": "x"}])
    with pytest.raises(UserError):
        render_chat_template("{{ ''.__class__.__mro__ }}", [{"role": "user", "content": "x"}])  # sandbox
    with pytest.raises(UserError, match="empty"):
        render_chat_template("x", [])


# ---- SentencePiece-style GGUF vocabularies ------------------------------------------------------------------


def _write_spm_gguf(path, arch: str, add_space_prefix: bool | None):
    """A small but real SentencePiece-BPE vocabulary: bytes, control tokens, and every substring (up to 5
    characters) of a training text's words with '▁' marking word starts, scored by frequency."""
    import collections

    import gguf
    import numpy as np

    text = " ".join(CORPUS[:12]) + " the then there hello help world word worn"
    counts: collections.Counter = collections.Counter()
    for word in text.split():
        w = "▁" + word
        for i in range(len(w)):
            for j in range(i + 1, min(len(w), i + 5) + 1):
                counts[w[i:j]] += 1
    special = ["<unk>", "<s>", "</s>"]
    pieces = [p for p, _ in counts.most_common() if p not in special]
    rng = np.random.default_rng(0)
    tokens = special + [f"<0x{b:02X}>" for b in range(256)] + ["<tool>"] + pieces
    types = [2, 3, 3] + [6] * 256 + [4] + [1] * len(pieces)
    scores = [0.0] * 260 + [-float(i) - rng.random() * 0.5 for i in range(len(pieces))]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores(scores)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    if add_space_prefix is not None:
        w.add_add_space_prefix(add_space_prefix)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()


@pytest.mark.parametrize("arch", ["llama", "phi3", "gemma2"])
def test_spm_gguf_matches_transformers(arch, tmp_path):
    from transformers import AutoTokenizer

    path = tmp_path / f"{arch}.gguf"
    _write_spm_gguf(path, arch, None)
    ours = load_tokenizer(path)
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    texts = CORPUS + ["<s>hello</s> world<tool>x", "<unk> the  there"]
    for text in texts:
        for add in (True, False):
            want = ref.encode(text, add_special_tokens=add)
            assert ours.encode(text, add_special_tokens=add) == want, (text, add)
            assert ours.decode(want) == ref.decode(want), text
        deltas, tail = _stream(ours, ref.encode(text, add_special_tokens=False))
        assert "".join(deltas) + tail == ref.decode(ref.encode(text, add_special_tokens=False))
    assert ours.add_bos_token and ours.bos_token_id == 1 and 2 in ours.eos_token_ids


# ---- byte-level GGUF vocabularies with other pre-tokenizers -------------------------------------------------


def _write_bpe_gguf(path, source_gguf, pre: str, add_bos: bool, n_vocab: int = 6000):
    """The first n_vocab tokens of SmolLM2's vocabulary (a valid BPE on its own: merges are kept only where
    both parts and the result survive) under another tokenizer.ggml.pre."""
    import gguf

    from llmcli.formats.gguf_reader import gguf_metadata

    meta = gguf_metadata(source_gguf)
    tokens = meta["tokenizer.ggml.tokens"][:n_vocab]
    kept = set(tokens)
    merges = [
        m
        for m in meta["tokenizer.ggml.merges"]
        if (lambda a, b: a in kept and b in kept and a + b in kept)(*m.split(" ", 1))
    ]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(meta["tokenizer.ggml.token_type"][:n_vocab])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(add_bos)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()


@pytest.mark.parametrize(
    "pre,add_bos", [("llama-bpe", True), ("qwen2", False), ("gpt-4o", False), ("tekken", False), ("default", True)]
)
def test_bpe_pre_tokenizers_match_transformers(pre, add_bos, smollm2_gguf, tmp_path):
    from transformers import AutoTokenizer

    path = tmp_path / "bpe.gguf"
    _write_bpe_gguf(path, smollm2_gguf, pre, add_bos)
    ours = load_tokenizer(path)
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in CORPUS + [
        "Hello123world 12345 I'M 'LL x\r\n\r\n  y",
        "ÀÉÎ ÕÜ Straße ǅungla",
        "a   \n  b\t\t c",
        "#include <stdio.h>\nint main(void) {\n\treturn 0;\n}\n",
        "x=1;\ny=2;\r\n\r\nz = x+y",
        "hello!!!??? ...\n\n\n   indented\n  \n",
        "—«quoted»— “smart” ‘quotes’",
    ]:
        assert ours.encode(text) == ref.encode(text), (pre, text)
        ids = ref.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == ref.decode(ids)
    assert ours.add_bos_token is add_bos


def test_no_template_and_named_templates(saved_dir, tmp_path):
    d = _copy_dir(saved_dir, tmp_path / "t")
    (d / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(d)
    assert tok.chat_template is None
    with pytest.raises(UserError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    # An explicit template text still works, with the tokenizer's special tokens as variables.
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], template="{{ eos_token }}") == cfg["eos_token"]
