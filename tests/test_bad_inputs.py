"""Every bad input gets one line on stderr, the right exit code, and no traceback."""

import json

import pytest


def one_line_error(r, code, *needles):
    assert r.exit_code == code, (r.exit_code, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("moespeq: error: ")
    assert "Traceback" not in r.stderr and r.stdout == ""
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def run(cli, path, *extra):
    return cli("run", str(path), "--prompt", "hello world", "-n", "4", "--backend", "cpu", *extra)


def test_missing_directory(cli, tmp_path):
    one_line_error(run(cli, tmp_path / "nope"), 2, "does not exist")


def test_unknown_model_name(cli):
    one_line_error(cli("run", "not-a-model"), 2, "unknown model", "mixtral")


@pytest.mark.parametrize(
    "args, suggestion",
    [
        (["plan", "Mixtral"], "(did you mean 'mixtral'?)"),  # the case
        (["plan", "qwen3moe"], "(did you mean 'qwen3-moe'?)"),  # a typo
        (["plan", "mixtral", "--hardware", "RTX3060-12GB"], "(did you mean 'rtx3060-12gb'?)"),
        (["plan", "mixtral", "--hardware", "rtx4090"], "(did you mean 'rtx4090-24gb'?)"),  # the start of one
    ],
)
def test_a_name_a_case_or_a_typo_away_is_suggested(cli, args, suggestion):
    one_line_error(cli(*args), 2, suggestion)
    far = [a if a not in ("Mixtral", "qwen3moe", "RTX3060-12GB", "rtx4090") else "zzzz" for a in args]
    assert "did you mean" not in cli(*far).stderr


def test_alias_not_downloaded(cli, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    one_line_error(cli("run", "olmoe"), 2, "moespeq pull olmoe")


def test_missing_config(cli, ckpt, tmp_path):
    """A directory without config.json is not a checkpoint: the argument is wrong (exit 2), as
    for a file; `plan` says the same."""
    (ckpt / "config.json").unlink()
    one_line_error(run(cli, ckpt), 2, "has no config.json")
    (tmp_path / "empty").mkdir()
    one_line_error(cli("plan", str(tmp_path / "empty")), 2, "has no config.json", "moespeq pull")


def test_unknown_model_type_lists_supported(cli, ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "llama"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    line = one_line_error(run(cli, ckpt), 1, "'llama'")
    for t in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "phimoe", "deepseek_v2", "deepseek_v3", "glm4_moe"):
        assert t in line


@pytest.mark.parametrize("method", ["mxfp4", "awq"])
def test_quantized_checkpoint_is_refused_clearly(cli, ckpt, method):
    """A format moespeq does not read for this family (MXFP4 is gpt-oss's): one line naming it."""
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": method, "weight_block_size": [128, 128]}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    one_line_error(run(cli, ckpt), 1, repr(method), "bf16")


def test_a_file_named_like_a_hub_id_is_a_file(cli, tmp_path, monkeypatch):
    """`plan q/fp8.json` (a relative path without ./) was taken for a hub id: "not
    downloaded; moespeq pull q/fp8.json"; `plan` reads a config file given itself."""
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "fp8.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    one_line_error(cli("run", "q/fp8.json"), 2, "q/fp8.json is a file, not a checkpoint directory")
    one_line_error(cli("plan", "q/fp8.json"), 1, "names no model_type")  # (plan reads a config file itself)
    (tmp_path / "notes.txt").write_text("{}")  # any other file: plan says it takes a config file too
    one_line_error(cli("plan", "notes.txt"), 2, "is a file", "directory that holds config.json, or that config.json")
    (tmp_path / "mixtral").write_text("")  # a file named as an alias: the alias, as run takes it
    r = cli("plan", "mixtral", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["model_type"] == "mixtral", r.stderr
    from moespeq_cli.model_ref import CONFIGS_DIR

    (tmp_path / "q" / "config.json").write_text((CONFIGS_DIR / "mixtral.json").read_text())
    r = cli("plan", "q/config.json", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["model_type"] == "mixtral", r.stderr


def test_a_config_error_names_the_whole_path(cli, ckpt):
    """ "config.json lacks 'hidden_size'" said which file with many models only by luck:
    the path is named."""
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["hidden_size"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    one_line_error(cli("plan", str(ckpt)), 1, f"{ckpt / 'config.json'} lacks 'hidden_size'")


@pytest.mark.parametrize("quant", ["fp8", ["fp8"], 8])
def test_a_quantization_config_that_is_not_an_object(cli, ckpt, quant):
    """A string (`"quantization_config": "fp8"`) was an internal error (AttributeError)."""
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"] = quant
    (ckpt / "config.json").write_text(json.dumps(cfg))
    one_line_error(run(cli, ckpt), 1, "quantization_config must be an object", "fix the file")
    one_line_error(cli("plan", str(ckpt)), 1, "quantization_config must be an object")


def test_fp8_config_over_float_weights_is_refused_clearly(cli, ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    one_line_error(run(cli, ckpt), 1, "FP8 (e4m3)", "disagree")


def test_truncated_safetensors(cli, ckpt):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    one_line_error(run(cli, ckpt), 1, "truncated or corrupt")


def test_missing_tensor(cli, ckpt):
    from safetensors.torch import load_file, save_file

    f = ckpt / "model.safetensors"
    sd = load_file(f)
    del sd["model.layers.1.self_attn.k_proj.weight"]
    save_file(sd, f, metadata={"format": "pt"})
    one_line_error(run(cli, ckpt), 1, "model.layers.1.self_attn.k_proj.weight", "missing")


def test_missing_expert(cli, ckpt):
    from safetensors.torch import load_file, save_file

    f = ckpt / "model.safetensors"
    sd = load_file(f)
    del sd["model.layers.0.block_sparse_moe.experts.3.w2.weight"]
    save_file(sd, f, metadata={"format": "pt"})
    one_line_error(run(cli, ckpt), 1, "experts.3.w2", "missing")


def test_shape_disagrees_with_config(cli, ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["intermediate_size"] += 8
    (ckpt / "config.json").write_text(json.dumps(cfg))
    one_line_error(run(cli, ckpt), 1, "shape", "config.json")


def test_attention_shape_disagrees(cli, ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["num_key_value_heads"] = 3
    (ckpt / "config.json").write_text(json.dumps(cfg))
    one_line_error(run(cli, ckpt), 1, "k_proj", "shape")


def test_bin_only_checkpoint_is_refused(cli, ckpt):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"not really a pickle")
    one_line_error(run(cli, ckpt), 1, "never unpickles")


def test_empty_prompt(cli, ckpt):
    one_line_error(cli("run", str(ckpt), "--prompt", "   ", "--backend", "cpu"), 2, "prompt is empty")


def test_missing_prompt_file(cli, ckpt, tmp_path):
    one_line_error(cli("run", str(ckpt), "--prompt-file", str(tmp_path / "none.txt")), 2, "does not exist")


@pytest.mark.parametrize("n", ["0", "-3"])
def test_non_positive_token_count(cli, ckpt, n):
    one_line_error(cli("run", str(ckpt), "--max-new-tokens", n), 2, "--max-new-tokens")


def test_bad_option(cli, ckpt):
    one_line_error(cli("run", str(ckpt), "--frobnicate"), 2, "--frobnicate")


def test_unknown_backend(cli, ckpt):
    one_line_error(run(cli, ckpt, "--backend", "tpu"), 2, "backend")


def test_malformed_config_json(cli, ckpt):
    (ckpt / "config.json").write_text("{not json")
    one_line_error(run(cli, ckpt), 1, "not valid JSON")


def test_debug_shows_traceback(cli, ckpt, monkeypatch):
    monkeypatch.setenv("MOESPEQ_DEBUG", "1")
    (ckpt / "config.json").write_text("{not json")
    r = run(cli, ckpt)
    assert r.exit_code == 1 and "Traceback" in r.stderr


def test_v3_router_named_in_a_v2_config_is_refused(cli, tiny, tmp_path):
    """DeepSeek-V3's configs say topk_method noaux_tc (read by deepseek_v3); a deepseek_v2
    config naming it would otherwise route with V2's softmax: refused in one line."""
    import shutil

    src, _ = tiny("deepseek_v2", "lite")
    path = tmp_path / "ckpt"
    shutil.copytree(src, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["topk_method"] = "noaux_tc"
    (path / "config.json").write_text(json.dumps(cfg))
    one_line_error(run(cli, path), 1, "noaux_tc", "deepseek_v3")


@pytest.mark.parametrize(
    "family,variant,edit",
    [
        ("deepseek_v3", "v3", {"n_group": 3}),  # 8 experts in 3 groups (was "internal error: RuntimeError")
        ("deepseek_v3", "v3", {"topk_group": 5}),  # more groups kept than there are
        ("deepseek_v3", "v3", {"topk_group": 1}),  # one group of 2 experts for a top-3
        ("glm4_moe", "qknorm", {"n_group": 3}),
        ("deepseek_v3", "flat", {"n_group": None, "topk_group": None}),  # V3's default 8 groups of 6 experts
    ],
)
def test_impossible_expert_groups_are_refused(cli, tiny, tmp_path, family, variant, edit):
    """Group-limited routing (DeepSeek-V3, GLM-4.5) with groups that cannot be formed or
    kept: one line naming the fields, from `run` and `plan` alike."""
    from tiny_models import edited_copy

    src, _ = tiny(family, variant)
    path = edited_copy(src, tmp_path / "ckpt", config=lambda c: c.update(edit))
    one_line_error(run(cli, path), 1, "n_group", "topk_group")
    one_line_error(cli("plan", str(path)), 1, "n_group", "topk_group")


def test_experts_in_another_dtype_name_the_one_they_differ_from(cli, ckpt):
    """Layer 0's expert 0 sets the dtype every expert is moved in: an expert of layer 1
    stored otherwise is named against it, with the way out (the message said "than the
    rest" when only that expert was the odd one out, or only layer 0 was)."""
    import torch
    from safetensors.torch import load_file, save_file

    weights = load_file(ckpt / "model.safetensors")
    for w in ("w1", "w2", "w3"):
        key = f"model.layers.1.block_sparse_moe.experts.2.{w}.weight"
        weights[key] = weights[key].to(torch.float16)
    save_file(weights, ckpt / "model.safetensors")
    one_line_error(
        run(cli, ckpt, "--backend", "mock"), 1, "expert 2 of layer 1", "F16", "expert 0 of layer 0", "F32", "save"
    )


def test_messages_say_what_is_wrong_with_the_file(cli, ckpt):
    """Found by a QA pass: a config without model_type read "model_type None is not
    supported"; a valid rope type moespeq lacks was told to "fix the file"; a symlink loop
    in place of the weights "is too many levels of symbolic links"; a dangling
    tokenizer.json (a partial hub download) was told to "give the path of a file"."""
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "model_type"}))
    one_line_error(run(cli, ckpt), 1, "names no model_type")
    (ckpt / "config.json").write_text(
        json.dumps({**cfg, "rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}})
    )
    line = one_line_error(run(cli, ckpt), 1, "'llama3'", "does not implement")
    assert "fix the file" not in line
    (ckpt / "config.json").write_text(json.dumps(cfg))
    (ckpt / "tokenizer.json").unlink()
    (ckpt / "tokenizer.json").symlink_to("../blobs/gone")
    one_line_error(run(cli, ckpt), 1, "tokenizer.json", "dangling", "download the checkpoint again")
    (ckpt / "model.safetensors").unlink()
    (ckpt / "model.safetensors").symlink_to("model.safetensors")
    one_line_error(run(cli, ckpt), 1, "cannot be read (too many levels of symbolic links)")


def test_fp8_experts_without_their_config_are_not_called_mixed(cli, ckpt):
    """Every expert in FP8 but no quantization_config: said as such (it read "mix dtypes
    ['F8_E4M3']", and to save the checkpoint in one dtype)."""
    import torch
    from safetensors.torch import load_file, save_file

    weights = load_file(ckpt / "model.safetensors")
    for key in [k for k in weights if ".experts." in k]:
        weights[key] = weights[key].to(torch.float8_e4m3fn)
    save_file(weights, ckpt / "model.safetensors")
    line = one_line_error(run(cli, ckpt, "--backend", "mock"), 1, "stored as F8_E4M3", "quantization_config")
    assert "mix" not in line


def test_a_composite_config_without_its_text_config_says_so(cli, tiny, tmp_path):
    """A multimodal checkpoint's config without text_config was said to lack
    num_hidden_layers and be "not a qwen3_5_moe model"."""
    from test_composite_checkpoints import composite_copy

    src, _ = tiny("qwen3_5_moe", "text")
    bad = tmp_path / "bad"
    composite_copy(src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    del cfg["text_config"]
    (bad / "config.json").write_text(json.dumps(cfg))
    for cmd in (("run", str(bad), "-p", "hi", "-n", "2", "--backend", "cpu"), ("plan", str(bad))):
        one_line_error(cli(*cmd), 1, "has no text_config")


@pytest.mark.parametrize("family,variant", [("glm4_moe", "base"), ("qwen3_next", "hybrid")])
def test_an_odd_number_of_rotary_dimensions_is_refused(tiny, family, variant):
    """head_dim x partial_rotary_factor odd (22 x 0.5): moespeq rotated one dimension fewer
    than transformers and gave other tokens without a word."""
    from moespeq_cli.errors import CheckpointError
    from moespeq_cli.models import build_model, parse_config

    src, _ = tiny(family, variant)
    raw = json.loads((src / "config.json").read_text())
    arch, _ = parse_config(raw, "config.json")
    build_model(arch, raw, 16, "config.json")  # as built: even
    with pytest.raises(CheckpointError, match="an odd number"):
        build_model(arch, dict(raw, head_dim=22, partial_rotary_factor=0.5), 16, "config.json")


@pytest.mark.parametrize(
    "exc,command,said",
    [
        (MemoryError(), "run", "out of host memory; give a smaller --ram or a shorter --context"),
        (
            RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory"),
            "quantize",
            "out of host memory; free some memory",  # (it holds one expert at a time: no hint of its own)
        ),
        (
            RuntimeError("unable to mmap 246997272 bytes from file <m.safetensors>: Cannot allocate memory (12)"),
            "chat",
            "out of host memory; give a smaller --ram",
        ),
        (OSError(12, "Cannot allocate memory"), "calibrate", "out of host memory; free some memory"),
        (ImportError("libstdc++.so.6: failed to map segment from shared object"), None, "out of host memory"),
        (
            RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
            "run",
            "out of GPU memory; give a smaller --vram",
        ),
    ],
)
def test_running_out_of_memory_is_said_so_with_what_to_do_for_the_command(capsys, exc, command, said):
    """An allocation that fails is "out of memory" with the command's remedy however it
    surfaced (it was "internal error: RuntimeError: ..." from torch's allocator or its mmap,
    and quantize was told to lower a --max-new-tokens it does not have)."""
    from moespeq_cli.cli.errors import exit_for

    with pytest.raises(SystemExit) as e:
        exit_for(exc, command)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith(f"moespeq: error: {said}") and err.count("\n") == 1 and "internal error" not in err


def test_an_output_on_a_read_only_file_system_is_not_called_write_protected(tmp_path, monkeypatch):
    """On a read-only mount the file's mode is fine and no chmod helps: say what it is."""
    import os
    import types

    from moespeq_cli.errors import UsageError
    from moespeq_cli.fs import check_output

    out = tmp_path / "t.json"
    out.write_text("{}")
    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    with pytest.raises(UsageError, match="is write-protected; make it writable"):
        check_output(out, "--trace")
    monkeypatch.setattr(os, "statvfs", lambda p: types.SimpleNamespace(f_flag=os.ST_RDONLY))
    with pytest.raises(UsageError, match="is on a read-only file system; write elsewhere"):
        check_output(out, "--trace")


def test_a_profiles_directory_without_profiles_is_named(cli, monkeypatch, tmp_path):
    """MOESPEQ_PROFILES at a directory holding none said "unknown hardware profile
    'rtx3060-12gb'; available:  (or pass ...)", the list empty and the cause unnamed."""
    monkeypatch.setenv("MOESPEQ_PROFILES", str(tmp_path / "none"))
    for args in (("plan",), ("plan", "--list-hardware")):
        r = cli(*args)
        assert (
            r.exit_code == 2 and "MOESPEQ_PROFILES" in r.stderr and "not a directory of hardware profiles" in r.stderr
        )


def test_environment_switches_read_as_people_write_them(monkeypatch):
    """MOESPEQ_DEBUG=false turned tracebacks on (only "" and "0" were off, where
    MOESPEQ_KERNELS takes off/no/false); MOESPEQ_KERNEL_SPIN=² was an internal error
    (a superscript digit is a digit to str.isdigit)."""
    from moespeq_cli.errors import debug
    from moespeq_cli.kernels import _spin

    for off in ("", "0", "false", "False", "no", "off"):
        monkeypatch.setenv("MOESPEQ_DEBUG", off)
        assert not debug(), off
    for on in ("1", "yes", "true"):
        monkeypatch.setenv("MOESPEQ_DEBUG", on)
        assert debug(), on
    monkeypatch.setenv("MOESPEQ_KERNEL_SPIN", "²")
    assert _spin() == 20000
    monkeypatch.setenv("MOESPEQ_KERNEL_SPIN", "500")
    assert _spin() == 500


@pytest.mark.parametrize(
    "args, words",
    [
        (["run", "Why is the sky blue?"], "a model's name has no spaces (a prompt? `run`, `profile`"),
        (["chat", "why is\nthe sky blue"], "a model's name has no spaces"),
        (["run", "demo", "Why is the sky blue?"], 'a prompt goes in -p "..."'),
        (["chat", "demo", "hi"], "chat takes its messages at its prompt"),
    ],
)
def test_a_prompt_typed_as_ollama_takes_it_says_where_it_goes(cli, args, words):
    r = cli(*args)
    assert r.exit_code == 2 and words in r.stderr and r.stderr.count("\n") == 1, r.stderr
