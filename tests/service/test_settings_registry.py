"""Settings sources and their priority; the model registry (parsing, sizes, names, selection)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.registry import Registry, SizeRule, UnknownModelError, VariantKey, derive_size_rule, parse_size
from service.settings import load_settings


def test_defaults_are_embedded_on_the_shipped_models() -> None:
    s = load_settings(None)
    assert s.redis_url is None and s.embedded
    reg = Registry.from_settings(s)
    assert [str(k) for k in reg.variant_keys()] == [
        f"shapes-{m}:{v}" for m in ("mmdit", "flux", "unet") for v in ("fp", "w8a8-segquant", "w4a8-segquant")
    ]
    assert reg.default_model.source == "shipped:mmdit"
    assert [m.source for m in reg.models.values()] == ["shipped:mmdit", "shipped:flux", "shipped:unet"]
    assert s.worker.preload is None  # the worker then preloads the first model's default variant only


def test_file_then_env_then_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("port: 9001\nkey_prefix: fromfile\nqueue:\n  max_depth: 7\n  result_ttl_s: 60\n")
    s = load_settings(cfg)
    assert (s.port, s.key_prefix, s.queue.max_depth, s.queue.result_ttl_s) == (9001, "fromfile", 7, 60)
    monkeypatch.setenv("SEGQUANT_KEY_PREFIX", "fromenv")
    monkeypatch.setenv("SEGQUANT_QUEUE__MAX_DEPTH", "9")
    s = load_settings(cfg)
    assert (s.key_prefix, s.queue.max_depth, s.queue.result_ttl_s) == ("fromenv", 9, 60)
    s = load_settings(cfg, key_prefix="fromflag", port=None)
    assert (s.key_prefix, s.port) == ("fromflag", 9001)


def test_toml_config_and_api_keys_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "serve.toml"
    cfg.write_text('redis_url = "redis://example:6379/0"\n[worker]\nmax_batch_size = 2\n')
    monkeypatch.setenv("SEGQUANT_API_KEYS", "k1, k2")
    s = load_settings(cfg)
    assert s.redis_url == "redis://example:6379/0" and not s.embedded
    assert s.worker.max_batch_size == 2
    assert [k.get_secret_value() for k in s.api_keys] == ["k1", "k2"]


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="reclaim_idle_s"):
        load_settings(None, queue={"heartbeat_interval_s": 5, "reclaim_idle_s": 6})
    with pytest.raises(ValidationError, match="placeholder"):
        load_settings(None, api_keys=["changeme"])
    with pytest.raises(FileNotFoundError):
        load_settings(tmp_path / "missing.yaml")


def test_registry_file_short_and_long_forms(tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    path.write_text(
        json.dumps(
            {
                "models": [
                    {"name": "a", "source": "tiny:mmdit", "variants": ["fp", "w8a8-segquant"]},
                    {
                        "name": "b",
                        "source": "tiny:mmdit",
                        "default_variant": "q",
                        "sizes": {"multiple_of": 16, "min": 16, "max": 64, "default": 32},
                        "variants": [{"name": "q", "recipe": "w8a8-segquant:dual=off", "calibration": {"samples": 4}}],
                    },
                ]
            }
        )
    )
    reg = Registry.from_file(path)
    assert reg.default_model.name == "a" and reg.model("a").default_variant == "fp"
    assert reg.model("b").variant(None).recipe == "w8a8-segquant:dual=off"
    assert reg.model("b").size_rule.multiple_of == 16
    assert reg.artifact_dir(VariantKey("a", "w8a8-segquant"), tmp_path) == tmp_path / "a" / "w8a8-segquant"
    assert reg.eval_report_path(VariantKey("a", "w8a8-segquant"), tmp_path).name == "eval.json"
    assert [str(k) for k in reg.select(["a:*"])] == ["a:fp", "a:w8a8-segquant"]
    assert [str(k) for k in reg.select(["b:q", "a:fp"])] == ["b:q", "a:fp"]


def test_unknown_names_list_the_valid_ones() -> None:
    reg = Registry.from_data([{"name": "a", "source": "tiny:mmdit", "variants": ["fp", "w4a8-segquant"]}])
    with pytest.raises(UnknownModelError) as e:
        reg.model("nope")
    assert e.value.valid == ["a"]
    with pytest.raises(UnknownModelError) as e:
        reg.model("a").variant("int3")
    assert e.value.valid == ["fp", "w4a8-segquant"]


def test_registry_errors() -> None:
    with pytest.raises(ValidationError, match="duplicate variant"):
        Registry.from_data([{"name": "a", "source": "tiny:mmdit", "variants": ["fp", "fp"]}])
    with pytest.raises(ValidationError, match="default_variant"):
        Registry.from_data([{"name": "a", "source": "tiny:mmdit", "variants": ["fp"], "default_variant": "x"}])
    with pytest.raises(ValueError, match="no models"):
        Registry([])


def test_sizes_come_from_the_model() -> None:
    # tiny MMDiT: patch 2, position table 16 → multiples of 2 up to 32, native 32
    assert derive_size_rule("tiny:mmdit") == SizeRule(multiple_of=2, min=2, max=32, default=32)
    # the shipped MMDiT: from its exported config, or from its training preset before export
    assert derive_size_rule("shipped:mmdit") == SizeRule(multiple_of=2, min=2, max=32, default=32)
    assert derive_size_rule("hub/unknown-model") == SizeRule()  # nothing on disk: generic bounds
    rule = SizeRule(multiple_of=2, min=2, max=32, default=32)
    assert rule.problem(32) is None
    assert "multiple of 2" in (rule.problem(33) or "")
    assert "between 2 and 32" in (rule.problem(64) or "")
    assert parse_size("16x32") == (16, 32)
    with pytest.raises(ValueError):
        parse_size("big")
