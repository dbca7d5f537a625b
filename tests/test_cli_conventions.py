"""Command-line conventions: every entry point's --help shows defaults and starts nothing; -v/--log-level set the
log level; sampling shows per-step progress on a terminal; runtime.generate and runtime.client share one set of
sampling flags."""
import importlib
import io
import logging

import pytest

ENTRY_POINTS = ["export.build", "export.refit", "export.demo_bundle", "export.scale_check", "runtime.generate",
                "runtime.serving.launcher", "runtime.serving.client", "benchmarks.run", "benchmarks.load",
                "benchmarks.flops", "benchmarks.unet_step", "benchmarks.dual_attention", "benchmarks.gpu_suite",
                "benchmarks.plot", "benchmarks.exporters", "benchmarks.samplers", "benchmarks.device_check"]


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_help_shows_defaults_and_starts_nothing(module, capsys, monkeypatch):
    import storymaker_serve.runtime.cli as cli

    started = []
    monkeypatch.setattr(cli, "configure_logging", lambda a: started.append(a))   # reached only after parsing
    mod = importlib.import_module(f"storymaker_serve.{module}")
    with pytest.raises(SystemExit) as e:
        mod.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("usage:") and "-v, --verbose" in out and "--log-level" in out
    assert not started
    parser_defaults = "(default:" in out or module in ("benchmarks.exporters",)
    assert parser_defaults, f"{module}: --help shows no default"


@pytest.mark.parametrize("argv,level", [([], logging.WARNING), (["-v"], logging.INFO), (["-vv"], logging.DEBUG),
                                        (["-v", "--log-level", "error"], logging.ERROR)])
def test_verbosity_flags(argv, level):
    from storymaker_serve.runtime.cli import argument_parser, configure_logging

    a = argument_parser("x", "doc").parse_args(argv)
    assert configure_logging(a) == level == logging.getLogger().level


def test_sampling_shows_per_step_progress_on_a_terminal(monkeypatch):
    import sys

    from storymaker_serve.runtime.cli import step_progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    err = Tty()
    monkeypatch.setattr(sys, "stderr", err)
    cb = step_progress("frame 1/3")
    for i in range(4):
        cb(i, 4)
    text = err.getvalue()
    assert "frame 1/3" in text and "/4 [" in text and "step" in text          # a bar of 4 steps
    quiet = io.StringIO()                                      # not a terminal (a log file): no bar
    monkeypatch.setattr(sys, "stderr", quiet)
    cb = step_progress("frame 2/3")
    cb(0, 1)
    assert quiet.getvalue() == ""


def test_generate_and_client_share_the_sampling_flags(monkeypatch):
    import storymaker_serve.runtime.cli as cli
    import storymaker_serve.runtime.serving.client as client
    from storymaker_serve.runtime.generate import parse_args

    gen = parse_args(["--weights", "w", "--prompt", "p", "--width", "640", "--negative-prompt", "blurry"])
    assert gen.width == 640 and gen.negative_prompt == "blurry" and gen.precision in ("fp16", "fp32")

    class Parsed(Exception):
        pass

    monkeypatch.setattr(client, "sampling_overrides", lambda a: (_ for _ in ()).throw(Parsed(
        {k: getattr(a, k) for k in cli.SAMPLING_KEYS})))
    with pytest.raises(Parsed) as e:
        client.main(["story.yaml", "--width", "640", "--negative-prompt", "blurry", "--controlnet-scale", "0.5"])
    seen = e.value.args[0]
    assert seen["width"] == 640 and seen["negative_prompt"] == "blurry" and seen["controlnet_scale"] == 0.5


def test_build_demo_has_a_default_out_and_real_builds_need_one(capsys):
    from pathlib import Path

    from storymaker_serve.export.build import parse_args

    assert parse_args(["--demo"]).out == Path("build/demo")
    with pytest.raises(SystemExit):
        parse_args(["--weights", "W"])
    assert "--out DIR is required" in capsys.readouterr().err


def test_help_names_the_console_script_it_was_started_as(monkeypatch, capsys):
    from storymaker_serve.runtime.serving.launcher import main

    monkeypatch.setattr("sys.argv", ["/venv/bin/storymaker-serve", "--help"])
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: storymaker-serve ") and "storymaker-serve --repo build/prod/triton_repo" in out
