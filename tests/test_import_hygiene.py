"""engine/ is a library: importing and running it must not pull in any UI package."""

import subprocess
import sys

UI_PACKAGES = ("textual", "rich", "typer")


def test_engine_imports_no_ui_packages():
    code = (
        "import sys, engine, engine.runner, engine.presets, engine.events, engine.data, engine.features, "
        "engine.adapters, engine.strategies, engine.compression, engine.runstore\n"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {UI_PACKAGES!r}]\n"
        "print(','.join(sorted(bad)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"engine imported UI modules: {out.stdout.strip()}"


def test_importing_engine_for_presets_does_not_load_torch():
    code = "import sys, engine, engine.presets, engine.events; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_checking_a_preset_does_not_load_torch():
    """The schema, every component's options and the resolve step (``fedtui check``, the console's first
    validation) stay torch-free, so a problem is reported in a fraction of a second."""
    code = (
        "import sys, engine.schema, engine.options.strategies, engine.options.codecs, engine.options.adapters\n"
        "from engine.presets import load_preset\n"
        "load_preset('presets/quickstart.toml', ['federation.aggregation=fedprox', 'adapter.kind=lora'])\n"
        "print('torch' in sys.modules, 'open_clip' in sys.modules)"
    )
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo)
    assert out.stdout.strip() == "False False"


def test_every_component_has_its_options_and_every_option_set_its_component():
    import engine.adapters
    import engine.compression
    import engine.strategies
    from engine.options.adapters import ADAPTER_KINDS
    from engine.options.codecs import CODECS
    from engine.options.strategies import AGGREGATIONS

    assert set(engine.adapters.base.ADAPTERS) == set(ADAPTER_KINDS.names())
    assert set(engine.strategies.base.STRATEGIES) == set(AGGREGATIONS.names())
    assert set(engine.compression.CODECS) == set(CODECS.names())
