"""GGUF export: files read back with gguf's reader, and run by llama.cpp itself
(llama-cpp-python): its greedy tokens for the merged GGUF and for base GGUF + LoRA GGUF
equal lorafit's with the adapter attached."""

from __future__ import annotations

import numpy as np
import pytest

from lorafit.core import adapter_io, lora
from lorafit.core.errors import LorafitError
from lorafit.core.lora import LoraConfig
from lorafit.models.loader import load_model

from conftest import build_hf_model

# Plain variants of the test families: llama.cpp's qwen2 has no sliding window and its
# llama has none either, so those features are switched off here (export warns about them).
GGUF_FAMILIES = {
    "llama": dict(),  # keeps conftest's llama3 rope scaling: the rope_freqs tensor is tested
    "mistral": dict(sliding_window=None),
    "qwen2": dict(use_sliding_window=False, sliding_window=None, attention_bias=True),
    "qwen3": dict(),  # head_dim 32 != hidden/heads, q/k norms, linear rope scaling
    "olmo2": dict(attention_bias=False),  # q/k norms over the whole projection
    "granite": dict(embedding_multiplier=3.0, residual_multiplier=0.5,
                    attention_multiplier=0.2, logits_scaling=4.0),
    "starcoder2": dict(sliding_window=None),  # LayerNorm with biases, GELU MLP
}
PROMPT = "the quick brown fox"
NEW_TOKENS = 12


def _adapted_model(root, mt, over, seed, tokenizer, torch_backend, targets="all-linear"):
    """(model folder, adapter folder, lorafit model with a random all-linear adapter)."""
    folder, _ = build_hf_model(root / "model", mt, tokenizer, seed=seed, **over)
    model = load_model(str(folder), torch_backend, "float32")
    cfg = LoraConfig(r=4, alpha=8.0, targets=targets)
    names = lora.attach(model, cfg, seed=1)
    rng = np.random.default_rng(seed)
    adapter = {k: rng.normal(0, 0.3, model.params[k].shape).astype(np.float32)
               for k in names}
    lora.detach(model)
    lora.attach(model, cfg, adapter)
    adapter_io.save_peft(root / "adapter", adapter, cfg, str(folder),
                         model.args.num_hidden_layers)
    model._tokenizer = tokenizer
    return folder, root / "adapter", model


@pytest.fixture(scope="module")
def adapted(tmp_path_factory, tokenizer, torch_backend):
    """{family: (model folder, adapter folder, lorafit model with the adapter attached)}."""
    return {mt: _adapted_model(tmp_path_factory.mktemp(f"gguf-{mt}"), mt, over, i, tokenizer,
                               torch_backend)
            for i, (mt, over) in enumerate(GGUF_FAMILIES.items())}


def _export(tmp_path, adapter_dir, merge, outtype="f32"):
    from lorafit.commands.export import export_gguf

    return export_gguf(adapter_dir, tmp_path / ("merged" if merge else "split"), merge,
                       outtype=outtype, backend="torch")


def test_adapter_gguf_metadata_and_tensors(tmp_path, adapted):
    from gguf import GGUFReader

    folder, adapter_dir, model = adapted["llama"]
    out = _export(tmp_path, adapter_dir, merge=False)
    r = GGUFReader(str(out / "adapter-f32.gguf"))
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert fields["general.type"] == "adapter"
    assert fields["general.architecture"] == "llama"
    assert fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == 8.0
    tensors = {t.name: t for t in r.tensors}
    _, adapter = adapter_io.load_peft(adapter_dir)
    assert len(tensors) == len(adapter)
    a = adapter["model.layers.1.mlp.down_proj.lora_A.weight"]
    np.testing.assert_array_equal(np.asarray(tensors["blk.1.ffn_down.weight.lora_a"].data), a)
    # q's B rows are permuted like the base weight (llama.cpp's interleaved rope)
    from lorafit.core.gguf_export import permute_rows

    b = adapter["model.layers.0.self_attn.q_proj.lora_B.weight"]
    got = np.asarray(tensors["blk.0.attn_q.weight.lora_b"].data)
    np.testing.assert_array_equal(got, permute_rows(b, 4))
    assert not np.array_equal(got, b)
    base = GGUFReader(str(out / "base-f32.gguf"))
    names = {t.name for t in base.tensors}
    assert {"token_embd.weight", "output.weight", "rope_freqs.weight", "blk.0.attn_q.weight"} \
        <= names
    tok = {k: f.contents() for k, f in base.fields.items() if k.startswith("tokenizer.")}
    assert tok["tokenizer.ggml.model"] == "gpt2" and tok["tokenizer.ggml.pre"] == "gpt-2"
    assert tok["tokenizer.ggml.tokens"][:3] == ["<pad>", "<s>", "</s>"]
    assert tok["tokenizer.ggml.eos_token_id"] == 2
    assert "tokenizer.chat_template" in tok and tok["tokenizer.ggml.merges"]


@pytest.mark.parametrize("outtype,tol", [("f16", 2e-3), ("bf16", 2e-2), ("q8_0", 2e-2)])
def test_merged_gguf_types_dequantize_close(tmp_path, adapted, outtype, tol):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    folder, adapter_dir, model = adapted["qwen3"]
    out = _export(tmp_path, adapter_dir, merge=True, outtype=outtype)
    r = GGUFReader(str(out / f"model-{outtype}.gguf"))
    t = next(t for t in r.tensors if t.name == "blk.1.ffn_up.weight")
    got = dequantize(t.data, t.tensor_type).reshape(112, 64)
    merged = lora.merged_weights(
        {"m.weight": model.backend.to_numpy(model.params["model.layers.1.mlp.up_proj.weight"])},
        {"m.lora_A.weight": model.backend.to_numpy(
            model.params["model.layers.1.mlp.up_proj.lora_A.weight"]),
         "m.lora_B.weight": model.backend.to_numpy(
            model.params["model.layers.1.mlp.up_proj.lora_B.weight"])}, model.lora.scale)
    want = merged["m.weight"]
    assert np.abs(got - want).max() <= tol * np.abs(want).max()
    assert t.tensor_type.name == outtype.upper()


def test_modelfile_template_renders_like_the_chat_template(tmp_path, adapted, tokenizer):
    from lorafit.core import modelfile

    folder, adapter_dir, _ = adapted["qwen2"]
    out = _export(tmp_path, adapter_dir, merge=False)
    text = (out / "Modelfile").read_text()
    assert text.startswith("FROM ./base-f32.gguf\nADAPTER ./adapter-f32.gguf\nTEMPLATE")
    assert 'PARAMETER stop "</s>"' in text
    # (transformers renders with trim_blocks: the newline after {% endif %} goes)
    assert ('TEMPLATE """{{ range $i, $m := .Messages }}{{ if eq $m.Role "system" }}<|system|>\n'
            '{{ $m.Content }}{{ else if eq $m.Role "user" }}<|user|>\n{{ $m.Content }}'
            '{{ else if eq $m.Role "assistant" }}<|assistant|>\n{{ $m.Content }}</s>'
            '{{ end }}{{ end }}<|assistant|>\n"""') in text
    render = lambda m, g: tokenizer.apply_chat_template(m, tokenize=False,  # noqa: E731
                                                        add_generation_prompt=g)
    p = modelfile._pieces(render)
    convo = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
             {"role": "user", "content": "c"}]
    assert modelfile.render_like_go(p, convo) == render(convo, True)
    assert modelfile.template_for(lambda m, g: "{% bad") is None


def test_unsupported_family_and_dora_are_one_line_errors(tmp_path, adapted):
    from lorafit.core.gguf_export import family, write_lora

    with pytest.raises(LorafitError, match="GGUF export supports .*'olmo' *$"):
        family({"model_type": "olmo"})
    olmo3 = {"model_type": "olmo3", "num_hidden_layers": 4}
    with pytest.raises(LorafitError, match="olmo3: llama.cpp's olmo2 has plain RoPE only on "
                                           "sliding layers"):
        family({**olmo3, "rope_parameters": {
            "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
            "full_attention": {"rope_type": "default", "rope_theta": 1e4}}})
    with pytest.raises(LorafitError, match="at the full layers' base"):
        family({**olmo3, "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            "full_attention": {"rope_type": "default", "rope_theta": 1e6}}})
    with pytest.raises(LorafitError, match="plain, linear or YaRN RoPE on full layers"):
        family({**olmo3, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    assert family({**olmo3, "rope_theta": 1e4, "rope_scaling": {  # transformers 4's form
        "rope_type": "yarn", "factor": 8.0}}).arch == "OLMO2"
    deltanet = {"model_type": "qwen3_next", "num_hidden_layers": 2, "linear_key_head_dim": 16,
                "linear_value_head_dim": 16, "num_experts": 4, "mlp_only_layers": [0]}
    with pytest.raises(LorafitError, match="qwen3_next: llama.cpp's qwen3next has mixture"):
        family(deltanet)
    with pytest.raises(LorafitError, match="value heads as wide as key heads"):
        family({**deltanet, "linear_value_head_dim": 8})
    with pytest.raises(LorafitError, match="full attention on every n-th layer"):
        family({**deltanet, "layer_types": ["full_attention", "linear_attention"]})
    vl = {"model_type": "qwen3_5_moe", "text_config": {**deltanet, "model_type": "x"}}
    assert family(vl).arch == "QWEN35MOE"  # the published (VL) checkpoints: the text model
    with pytest.raises(LorafitError, match="gpt-oss alternates sliding and full layers"):
        family({"model_type": "gpt_oss", "num_hidden_layers": 2, "sliding_window": 4,
                "layer_types": ["full_attention", "sliding_attention"]})
    with pytest.raises(LorafitError, match="qwen3_moe: llama.cpp's qwen3moe has no dense"):
        family({"model_type": "qwen3_moe", "mlp_only_layers": [1]})
    with pytest.raises(LorafitError, match="head_dim x heads"):
        family({"model_type": "exaone4", "head_dim": 32, "num_attention_heads": 4,
                "hidden_size": 64})
    g4 = {"model_type": "gemma4_text", "vocab_size": 320, "hidden_size": 64,
          "intermediate_size": 112, "num_hidden_layers": 2, "num_attention_heads": 4}
    with pytest.raises(LorafitError, match="gemma4 has plain RoPE only on sliding layers"):
        family({**g4, "rope_parameters": {
            "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
            "full_attention": {"rope_type": "default", "rope_theta": 1e6}}})
    with pytest.raises(LorafitError, match="plain or proportional RoPE on full layers"):
        family({**g4, "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            "full_attention": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e6}}})
    with pytest.raises(LorafitError, match="per_layer_model_projection: llama.cpp's gemma4 "
                                           "applies no LoRA there; export with --merge"):
        write_lora(tmp_path / "x.gguf", g4, {
            f"model.per_layer_model_projection.lora_{x}.weight": np.ones((4, 4))
            for x in "AB"}, 4, 8)
    with pytest.raises(LorafitError, match="GGUF export supports .*mistral3.*'olmo'"):
        family({"model_type": "olmo"})
    with pytest.raises(LorafitError, match="no DoRA"):
        write_lora(tmp_path / "x.gguf", {"model_type": "llama", "num_hidden_layers": 2},
                   {"model.layers.0.self_attn.q_proj.lora_magnitude_vector": np.ones(4)}, 4, 8)
    with pytest.raises(LorafitError, match="q_proj: the adapter has lora_B but no lora_A"):
        write_lora(tmp_path / "x.gguf", {"model_type": "llama", "num_hidden_layers": 2},
                   {"model.layers.0.self_attn.q_proj.lora_B.weight": np.ones((4, 4))}, 4, 8)
    with pytest.raises(LorafitError, match="no adapter on gpt-oss's experts; merge"):
        write_lora(tmp_path / "x.gguf", {"model_type": "gpt_oss", "num_hidden_layers": 2},
                   {f"model.layers.0.mlp.experts.down_proj.lora_{x}.weight": np.ones((4, 4))
                    for x in "AB"}, 4, 8)


# -- llama.cpp itself -----------------------------------------------------------------------

def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:  # the test extra installs it (it builds from source)
        pytest.skip(f"llama-cpp-python is not importable ({e}); pip install llama-cpp-python")
    return llama_cpp


def _llama_greedy(path, ids, lora_path=None, all_logits=False, new_tokens=NEW_TOKENS):
    """llama.cpp's greedy continuation of ids, and its logits over the prompt (all_logits:
    over the prompt and the generated tokens but the last)."""
    llama_cpp = _llama_cpp()
    llm = llama_cpp.Llama(model_path=str(path), lora_path=lora_path and str(lora_path),
                          n_ctx=64, n_threads=2, n_batch=64, logits_all=True, verbose=False,
                          type_k=0, type_v=0)  # GGML_TYPE_F32: no f16 KV cache rounding
    try:
        assert llm.tokenize(PROMPT.encode(), add_bos=False, special=False) == ids  # tokenizer
        llm.eval(ids)
        prompt_logits = np.array(llm.scores[:len(ids)])
        out = []
        for _ in range(new_tokens):
            out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([out[-1]])
        if all_logits:
            prompt_logits = np.array(llm.scores[:len(ids) + NEW_TOKENS - 1])
    finally:
        llm.close()
    return out, prompt_logits


def _lorafit_greedy(model, ids):
    from lorafit.core.generate import generate_ids

    return list(generate_ids(model, ids, NEW_TOKENS, temperature=0.0))


@pytest.mark.slow
@pytest.mark.parametrize("family", list(GGUF_FAMILIES))
def test_llama_cpp_greedy_tokens_match_lorafit(tmp_path, adapted, tokenizer, family):
    folder, adapter_dir, model = adapted[family]
    _llama_cpp()
    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    want = _lorafit_greedy(model, ids)
    merged = _export(tmp_path, adapter_dir, merge=True)
    split = _export(tmp_path, adapter_dir, merge=False)
    got_merged, logits_merged = _llama_greedy(merged / "model-f32.gguf", ids)
    got_lora, logits_lora = _llama_greedy(split / "base-f32.gguf", ids,
                                          split / "adapter-f32.gguf")
    ops = model.backend
    ours = ops.to_numpy(model.logits(ops.from_numpy(np.asarray([ids]))))[0]
    tol = 2e-3 * np.abs(ours).max()
    assert np.abs(logits_merged - ours).max() < tol
    assert np.abs(logits_lora - ours).max() < tol
    assert got_merged == want
    assert got_lora == want
    lora.detach(model)  # the adapter matters: the base alone generates something else
    try:
        assert _lorafit_greedy(model, ids) != want
    finally:
        lora.attach(model, *adapter_io.load_peft(adapter_dir))


@pytest.mark.slow
@pytest.mark.parametrize("regex", ["LLAMA3_REGEX", "QWEN2_REGEX"])
def test_llama3_and_qwen2_pre_tokenizers_split_text_as_in_transformers(tmp_path, adapted,
                                                                      regex):
    """The pre-tokenizer names written for Llama 3 / Qwen2 style tokenizer.json files make
    llama.cpp split text (digits, contractions, newlines) exactly as transformers does."""
    import json

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lorafit.core import gguf_export
    from lorafit.models.tiny import SPECIALS

    llama_cpp = _llama_cpp()
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(getattr(gguf_export, regex)), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    text = "It's 12345 apples,\n\n  don't   they? 7 x 89 = 623\tok\r\nend"
    tk.train_from_iterator([text, PROMPT] * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>")
    hf.save_pretrained(str(tmp_path / "tok"))
    assert gguf_export.pre_tokenizer_name(json.loads((tmp_path / "tok" / "tokenizer.json")
                                                     .read_text())) in ("llama-bpe", "qwen2")
    folder, _, model = adapted["llama"]
    from lorafit.models.loader import read_config

    weights = {k: model.backend.to_numpy(v) for k, v in model.params.items()
               if ".lora_" not in k}
    path = gguf_export.write_model(tmp_path / "m.gguf", read_config(folder), weights,
                                   tmp_path / "tok", "f32")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        for sample in (text, "999 1234567 can't\n\n\nx  y"):
            assert llm.tokenize(sample.encode(), add_bos=False, special=False) == \
                hf(sample, add_special_tokens=False)["input_ids"]
    finally:
        llm.close()


def test_cli_names_a_family_llama_cpp_cannot_run(tmp_path, capsys):
    """Before any weight loads: the config alone decides."""
    import json

    from lorafit.cli import main

    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text(json.dumps(
        {"model_type": "qwen3_next", "num_hidden_layers": 4, "num_experts": 0}))
    (tmp_path / "ad").mkdir()
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": str(tmp_path / "base"), "peft_type": "LORA", "r": 4,
         "lora_alpha": 8, "target_modules": ["q_proj"]}))
    assert main(["export", str(tmp_path / "out"), "--adapter", str(tmp_path / "ad"),
                 "--format", "gguf"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "qwen3_next: llama.cpp's qwen3next has mixture" in err


def test_cli_refuses_a_gemma4_adapter_llama_cpp_would_not_apply(tmp_path, capsys):
    """LoRA on per_layer_model_projection (all-linear adapts it): a one-line error before
    any weight loads (the base folder here has none), unless merged."""
    import json

    from lorafit.cli import main

    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text(json.dumps(
        {"model_type": "gemma4_text", "vocab_size": 320, "hidden_size": 64,
         "intermediate_size": 112, "num_hidden_layers": 2, "num_attention_heads": 4,
         "hidden_size_per_layer_input": 8}))
    adapter = {f"model.per_layer_model_projection.lora_{x}.weight": np.ones((4, 4), np.float32)
               for x in "AB"}
    adapter_io.save_peft(tmp_path / "ad", adapter, LoraConfig(r=4, alpha=8.0),
                         str(tmp_path / "base"))
    assert main(["export", str(tmp_path / "out"), "--adapter", str(tmp_path / "ad"),
                 "--format", "gguf"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "per_layer_model_projection: llama.cpp's gemma4 applies no " \
        "LoRA there; export with --merge" in err


def test_export_warns_where_llama_cpp_computes_otherwise():
    from lorafit.core.gguf_export import unsupported_features as notes

    base = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=4)
    assert notes({**base, "model_type": "gemma2", "head_dim": 16,
                  "query_pre_attn_scalar": 16}) == []
    assert "query_pre_attn_scalar=24" in notes({**base, "model_type": "gemma2",
                                                "head_dim": 16, "query_pre_attn_scalar": 24})[0]
    assert notes({**base, "model_type": "smollm3", "no_rope_layer_interval": 4}) == []
    assert "every 4th" in notes({**base, "model_type": "smollm3",
                                 "no_rope_layer_interval": 2})[0]
    assert "renormalises" in notes({**base, "model_type": "qwen3_moe",
                                    "norm_topk_prob": False})[0]
    assert "truncates" in notes({**base, "model_type": "ministral3", "rope_parameters": {
        "rope_type": "yarn", "factor": 2.0, "truncate": False}})[0]
    assert "truncates" in notes({**base, "model_type": "olmo3", "rope_scaling": {
        "rope_type": "yarn", "factor": 2.0, "truncate": False}})[0]
    for mt in ("mixtral", "phi3", "exaone4", "ministral3"):
        assert "ignores sliding_window=6" in notes({**base, "model_type": mt,
                                                    "sliding_window": 6})[0]
    assert "renormalises" in notes({**base, "model_type": "qwen3_next",
                                    "norm_topk_prob": False})[0]
    published = {"rope_type": "yarn", "factor": 32.0, "truncate": False}
    assert notes({**base, "model_type": "gpt_oss", "rope_parameters": {**published,
                                                                        "truncate": True}}) == []
    assert "rounds its correction range" in notes({**base, "model_type": "gpt_oss",
                                                   "rope_parameters": published})[0]
    assert "SwiGLU" in notes({**base, "model_type": "gpt_oss", "swiglu_limit": 5.0})[0]


def test_cli_export_gguf_and_its_errors(tmp_path, adapted, capsys):
    from lorafit.cli import main

    folder, adapter_dir, _ = adapted["qwen3"]
    out = tmp_path / "cli"
    assert main(["export", str(out), "--adapter", str(adapter_dir), "--format", "gguf",
                 "--merge", "--outtype", "f32", "--backend", "torch"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "README.md", "model-f32.gguf"]
    card = (out / "README.md").read_text()
    assert f"base_model: {folder}" in card and "- gguf" in card and "library_name" not in card
    assert (out / "Modelfile").read_text().startswith("FROM ./model-f32.gguf\nTEMPLATE")
    # the target exists: one line, nothing overwritten
    assert main(["export", str(out), "--adapter", str(adapter_dir), "--format", "gguf"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("outtype,tol", [("f16", 2e-3), ("bf16", 2e-2), ("q8_0", 3e-2)])
def test_llama_cpp_runs_the_smaller_types(tmp_path, adapted, tokenizer, outtype, tol):
    """f16, bf16 and q8_0 files load in llama.cpp and give lorafit's logits within the
    type's rounding (llama.cpp also rounds activations for q8_0). A milder adapter than the
    fixture's: its large random updates make the tiny network amplify any rounding."""
    folder, adapter_dir, model = adapted["llama"]
    _llama_cpp()
    cfg, adapter = adapter_io.load_peft(adapter_dir)
    mild = {k: v * 0.2 for k, v in adapter.items()}
    adapter_io.save_peft(tmp_path / "mild", mild, cfg, str(folder), 2)
    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    out = _export(tmp_path, tmp_path / "mild", merge=True, outtype=outtype)
    _, logits = _llama_greedy(out / f"model-{outtype}.gguf", ids)
    ops = model.backend
    lora.detach(model)
    try:
        lora.attach(model, cfg, mild)
        ours = ops.to_numpy(model.logits(ops.from_numpy(np.asarray([ids]))))[0]
    finally:
        lora.detach(model)
        lora.attach(model, cfg, adapter)
    err = np.abs(logits - ours).max() / np.abs(ours).max()
    assert err < tol, err


# -- the families after the first seven: merged GGUF only, one llama.cpp load each ------------

def _longrope(n):
    rng = np.random.default_rng(n)
    return dict(rope_type="longrope", rope_theta=10000.0,
                short_factor=rng.uniform(1, 2, n).round(3).tolist(),
                long_factor=rng.uniform(1, 8, n).round(3).tolist())


# Each family's quirks switched on where llama.cpp implements them; windows (6) shorter than
# the prompt + generated tokens (16) on the sliding layers.
MERGED_FAMILIES = {
    # (1 + w) norms, both soft-caps biting, a sliding then a full layer
    "gemma2": dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=6,
                   attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
    # q/k norms, the sliding layer with its own RoPE base, linear scaling on the full one
    "gemma3_text": dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=6,
                        layer_types=["sliding_attention", "full_attention"],
                        rope_parameters={
                            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                            "full_attention": {"rope_type": "linear", "factor": 4.0,
                                               "rope_theta": 10000.0}}),
    # fused qkv / gate_up, partial rotary, LongRoPE past its original context (long factors)
    "phi3": dict(rope_parameters={**_longrope(4), "partial_rotary_factor": 0.5},
                 original_max_position_embeddings=2),
    # every 4th layer without RoPE
    "smollm3": dict(num_hidden_layers=4, no_rope_layer_interval=4,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
    # norms after the sublayers only, q/k norms (llama.cpp has windows only for 64 layers)
    "exaone4": dict(sliding_window=None, sliding_window_pattern=0, head_dim=16,
                    layer_types=["full_attention"] * 2),
    # fused gate_up, post-sublayer norms, interleaved partial rotary, q/k/v biases
    "glm4": dict(attention_bias=True, head_dim=32, partial_rotary_factor=0.5),
    # 4 experts, top 2, renormalised; q/k norms
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=40,
                      norm_topk_prob=True, head_dim=32),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=48,
                    sliding_window=None),
    # a sliding layer (window 6) and full ones with wider heads, proportional partial RoPE
    # and k = v (one kv head); the last layer reuses layer 1's k, v with a double-wide MLP;
    # per-layer input embeddings (a larger per-layer vocabulary); the MoE block (4 experts,
    # top 2, router scales) beside each MLP; plain-w norms, layer scalars, final soft-cap
    "gemma4_text": dict(head_dim=16, global_head_dim=32, sliding_window=6, num_hidden_layers=3,
                        num_kv_shared_layers=1,
                        layer_types=["sliding_attention", "full_attention", "full_attention"],
                        use_double_wide_mlp=True, hidden_size_per_layer_input=8,
                        vocab_size_per_layer_input=512, attention_k_eq_v=True,
                        num_global_key_value_heads=1, final_logit_softcapping=3.0,
                        enable_moe_block=True, num_experts=4, top_k_experts=2,
                        moe_intermediate_size=40),
    # YaRN with an mscale ratio (rope.scaling.attn_factor), Llama 4's query temperature
    # stepping every 8 positions
    "ministral3": dict(head_dim=32, tie_word_embeddings=False, sliding_window=None,
                       rope_parameters=dict(
                           rope_type="yarn", rope_theta=1e4, factor=4.0,
                           original_max_position_embeddings=8, beta_fast=32.0, beta_slow=1.0,
                           mscale=2.0, mscale_all_dim=0.5, llama_4_scaling_beta=0.1)),
    # llama.cpp's olmo2 with a window (6) on layer 0: plain RoPE there, YaRN (its betas and
    # attention factor) on the full layer; post-sublayer norms, q/k norms over the projection
    "olmo3": dict(num_hidden_layers=2, sliding_window=6,
                  layer_types=["sliding_attention", "full_attention"], rope_parameters={
                      "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                      "full_attention": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                         "original_max_position_embeddings": 8,
                                         "attention_factor": 1.3, "beta_fast": 32.0,
                                         "beta_slow": 1.0}}),
    # Gated DeltaNet + gated full attention, every 2nd layer full; 2 key heads for 4 value
    # heads (llama.cpp's tiled value-head order), partial rotary, (1 + w) norms
    "qwen3_5_text": dict(num_hidden_layers=2, head_dim=32,
                         layer_types=["linear_attention", "full_attention"],
                         linear_num_key_heads=2, linear_num_value_heads=4,
                         linear_key_head_dim=16, linear_value_head_dim=16),
    # fused DeltaNet projections (grouped order), 4 experts + a gated shared expert
    "qwen3_next": dict(num_hidden_layers=2, head_dim=32,
                       layer_types=["linear_attention", "full_attention"],
                       num_experts=4, num_experts_per_tok=2, moe_intermediate_size=40,
                       shared_expert_intermediate_size=24, norm_topk_prob=True,
                       linear_num_key_heads=2, linear_num_value_heads=4,
                       linear_key_head_dim=16, linear_value_head_dim=16),
    # sinks, q/k/v/o biases, a window (5) on layer 0, clamped SwiGLU experts with biases,
    # YaRN with its correction range rounded (llama.cpp's; the published truncate=false
    # differs: export warns)
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=40,
                    sliding_window=5, head_dim=16, attention_bias=True, rope_parameters=dict(
                        rope_type="yarn", rope_theta=150000.0, factor=32.0, beta_fast=16.0,
                        beta_slow=1.0, original_max_position_embeddings=4096, truncate=True)),
    # the qwen3_5 hybrid with 4 experts + a gated shared expert on every layer
    "qwen3_5_moe_text": dict(num_hidden_layers=2, head_dim=32,
                             layer_types=["linear_attention", "full_attention"],
                             num_experts=4, num_experts_per_tok=2, moe_intermediate_size=40,
                             shared_expert_intermediate_size=24, linear_num_key_heads=2,
                             linear_num_value_heads=4, linear_key_head_dim=16,
                             linear_value_head_dim=16),
}


# llama.cpp's gemma4 applies no LoRA to per_layer_model_projection (export refuses it
# without --merge): every other linear module, the router's among them
FAMILY_ADAPTERS = {"gemma4_text": dict(targets=[
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "proj",
    "per_layer_input_gate", "per_layer_projection"])}
# Families whose logits are compared with lorafit's computing GELU as llama.cpp's CPU
# backend does: input and output rounded to f16 (ggml's GELU table). Gemma 4's many GeGLUs
# (MLP, experts, per-layer inputs) under the fixture's large random adapter amplify that
# rounding past the tolerance; with it, llama.cpp's logits equal lorafit's to ~1e-4.
GGML_GELU = ("gemma4_text",)


def _ggml_gelu(monkeypatch, ops):
    exact = ops.gelu_tanh
    half = lambda x: ops.cast(ops.cast(x, "float16"), "float32")  # noqa: E731
    monkeypatch.setattr(ops, "gelu_tanh", lambda x: half(exact(half(x))))


@pytest.mark.slow
@pytest.mark.parametrize("family", list(MERGED_FAMILIES))
def test_llama_cpp_runs_the_merged_and_adapter_gguf_of_each_family(tmp_path, tokenizer,
                                                                   torch_backend, family,
                                                                   monkeypatch):
    """llama.cpp's greedy tokens on the merged GGUF, and on the base GGUF with the GGUF
    adapter (`--lora`: fused qkv / gate_up as one pair, MoE experts and routers per expert),
    equal lorafit's with the adapter, and their logits over prompt + generated tokens (past
    the windows) equal lorafit's."""
    _llama_cpp()
    seed = list(MERGED_FAMILIES).index(family)
    folder, adapter_dir, model = _adapted_model(tmp_path, family, MERGED_FAMILIES[family],
                                                seed, tokenizer, torch_backend,
                                                **FAMILY_ADAPTERS.get(family, {}))
    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    want = _lorafit_greedy(model, ids)
    ops = model.backend
    seq = ids + want[:-1]
    if family in GGML_GELU:
        _ggml_gelu(monkeypatch, ops)
    ours = ops.to_numpy(model.logits(ops.from_numpy(np.asarray([seq]))))[0]
    merged = _export(tmp_path, adapter_dir, merge=True)
    split = _export(tmp_path, adapter_dir, merge=False)
    if family in ("qwen3_moe", "mixtral"):  # the router and every expert adapted
        from gguf import GGUFReader

        shapes = {t.name: tuple(t.shape) for t in
                  GGUFReader(str(split / "adapter-f32.gguf")).tensors if "blk.1." in t.name}
        n, r = 4, 4  # (gguf lists shapes innermost first: in, rank, experts)
        assert shapes["blk.1.ffn_gate_exps.weight.lora_a"][1:] == (2 * r, n)  # PEFT's 2r
        assert shapes["blk.1.ffn_down_exps.weight.lora_b"][::2] == (r, n)
        assert "blk.1.ffn_up_exps.weight.lora_b" in shapes
        assert "blk.1.ffn_gate_inp.weight.lora_a" in shapes
    for path, lora_path in ((merged / "model-f32.gguf", None),
                            (split / "base-f32.gguf", split / "adapter-f32.gguf")):
        got, logits = _llama_greedy(path, ids, lora_path, all_logits=True)
        assert np.abs(logits - ours).max() < 2e-3 * np.abs(ours).max(), path.name
        assert got == want, path.name
    if family in ("qwen3_5_moe_text", "gpt_oss"):  # f16 runs: the conv1d, routers and
        f16 = _export(tmp_path / "f16", adapter_dir, merge=True, outtype="f16")  # expert
        _, logits = _llama_greedy(f16 / "model-f16.gguf", ids)  # biases stay f32 (ggml's ops)
        assert np.abs(logits - ours[:len(ids)]).max() < 2e-2 * np.abs(ours).max()


@pytest.mark.slow
@pytest.mark.parametrize("prefix", [True, False], ids=["llama2-style", "gemma-style"])
def test_sentencepiece_style_tokenizers_split_text_as_in_transformers(tmp_path, adapted,
                                                                      prefix):
    """A byte-fallback BPE tokenizer.json with `▁` for spaces (Llama 2 / Mistral: a `▁`
    prepended; Gemma: none) becomes llama.cpp's `llama` vocabulary: llama.cpp tokenizes
    text, unseen characters (byte fallback) included, exactly as transformers does."""
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lorafit.core import gguf_export
    from lorafit.models.loader import read_config

    llama_cpp = _llama_cpp()
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    folder, _, model = adapted["llama"]
    weights = {k: model.backend.to_numpy(v) for k, v in model.params.items()
               if ".lora_" not in k}

    def sentencepiece_like(vocab=None, merges=None):
        tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>",
                                  byte_fallback=True, fuse_unk=True))
        tk.normalizer = normalizers.Sequence(
            ([normalizers.Prepend("\u2581")] if prefix else [])
            + [normalizers.Replace(" ", "\u2581")])
        return tk

    def gguf_and_hf(name, tk):
        tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "),
                                        decoders.ByteFallback(), decoders.Fuse()])
        tj = json.loads(tk.to_str())  # byte pieces are vocabulary, not added (as Llama 2's)
        tj["added_tokens"] = [a for a in tj["added_tokens"] if a["content"] not in byte_tokens]
        hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(tj)),
                                     eos_token="</s>", unk_token="<unk>")
        hf.save_pretrained(str(tmp_path / name))
        path = gguf_export.write_model(tmp_path / f"{name}.gguf", read_config(folder),
                                       weights, tmp_path / name, "f32")
        return hf, llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)

    def same(hf, llm, samples):
        try:
            for sample in samples:
                want = hf(sample, add_special_tokens=False)["input_ids"]
                assert llm.tokenize(sample.encode(), add_bos=False, special=False) == want, \
                    sample
                assert len(want) < len(sample.encode())  # merges were applied
        finally:
            llm.close()

    text = "the quick brown fox jumps over the lazy dog, the quick brown cat"
    tk = sentencepiece_like()
    tk.train_from_iterator([text, PROMPT] * 4, trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials + byte_tokens))
    hf, llm = gguf_and_hf("trained", tk)
    assert any(hf.convert_ids_to_tokens(i) in byte_tokens
               for i in hf("é€", add_special_tokens=False)["input_ids"])
    same(hf, llm, (text, "the lazy fox  jumps", "é€ over 😀 dog", PROMPT))
    # merge order decides: "b c" before "a b", so "dabc" is d a bc, where joining the
    # leftmost known pair first would give d ab c
    pieces = specials + byte_tokens + ["\u2581", "a", "b", "c", "d", "bc", "ab", "\u2581d"]
    tk = sentencepiece_like({p: i for i, p in enumerate(pieces)},
                            [("b", "c"), ("a", "b"), ("\u2581", "d")])
    hf, llm = gguf_and_hf("ranked", tk)
    assert hf.convert_ids_to_tokens(hf("dabc", add_special_tokens=False)["input_ids"])[-2:] \
        == ["a", "bc"]
    same(hf, llm, ("dabc", "d dabc ab"))


@pytest.mark.slow
def test_mistral3_vision_language_folder_exports_its_text_tower(tmp_path, tokenizer,
                                                                torch_backend):
    """A Mistral 3 (Mistral3ForConditionalGeneration) folder: the GGUF files hold its
    ministral3 text tower as llama.cpp's mistral3, without the vision tower, and llama.cpp
    gives lorafit's logits with the adapter (PEFT names under model.language_model.)."""
    import torch
    import transformers
    from gguf import GGUFReader

    _llama_cpp()
    torch.manual_seed(0)
    text = dict(model_type="ministral3", vocab_size=len(tokenizer), hidden_size=64,
                intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                bos_token_id=1, eos_token_id=2, pad_token_id=0, rope_parameters=dict(
                    rope_type="yarn", rope_theta=1e4, factor=2.0,
                    original_max_position_embeddings=8, llama_4_scaling_beta=0.2))
    vision = dict(model_type="pixtral", hidden_size=32, intermediate_size=48,
                  num_hidden_layers=1, num_attention_heads=2, head_dim=16, image_size=32,
                  patch_size=8)
    ref = transformers.Mistral3ForConditionalGeneration(transformers.Mistral3Config(
        text_config=text, vision_config=vision, tie_word_embeddings=False))
    ref.save_pretrained(str(tmp_path / "model"))
    tokenizer.save_pretrained(str(tmp_path / "model"))
    model = load_model(str(tmp_path / "model"), torch_backend, "float32")
    cfg = LoraConfig(r=4, alpha=8.0, targets="all-linear")
    names = lora.attach(model, cfg, seed=1)
    rng = np.random.default_rng(5)
    adapter = {k: rng.normal(0, 0.3, model.params[k].shape).astype(np.float32) for k in names}
    lora.detach(model)
    lora.attach(model, cfg, adapter)
    adapter_io.save_peft(tmp_path / "adapter", adapter, cfg, str(tmp_path / "model"), 2)
    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    split = _export(tmp_path, tmp_path / "adapter", merge=False)
    base = GGUFReader(str(split / "base-f32.gguf"))
    assert base.fields["general.architecture"].contents() == "mistral3"
    assert base.fields["mistral3.attention.temperature_scale"].contents() == pytest.approx(0.2)
    assert len(base.tensors) == 2 * 9 + 3  # the text tower only
    _, logits = _llama_greedy(split / "base-f32.gguf", ids, split / "adapter-f32.gguf",
                              new_tokens=0)  # (ministral3's test generates)
    ops = model.backend
    ours = ops.to_numpy(model.logits(ops.from_numpy(np.asarray([ids]))))[0]
    assert np.abs(logits - ours).max() < 2e-3 * np.abs(ours).max()
