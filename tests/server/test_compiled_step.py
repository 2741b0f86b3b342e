"""A server over a ``compile_step`` model compiles its decode step at start-up, not at a request."""

from __future__ import annotations

from swapmoe.engine.decoder import decoder_for
from swapmoe.server import ServerConfig
from tests.server.conftest import MODEL_NAME, running_server


def test_a_compiled_server_compiles_before_serving_and_never_again(tiny_checkpoint):
    """Start-up compiles the step once, at the context length (the one cache every request then uses),
    and leaves the resident sets, importance and counters as a fresh load has them; requests of
    different lengths add no compile and answer what an uncompiled server answers."""
    config = ServerConfig(model_name=MODEL_NAME, max_queue=8, time_limit=120)
    with running_server(tiny_checkpoint, config, swaps_per_update=0) as plain:
        want = [plain.openai().completions.create(model=MODEL_NAME, prompt="The quick brown fox", max_tokens=n,
                                                  temperature=0).choices[0].text for n in (4, 40)]
    with running_server(tiny_checkpoint, config, swaps_per_update=0, compile_step=True) as running:
        model = running.model
        dec = decoder_for(model)
        assert dec.compiled is not None and dec.compiled.compiles == 1  # before any request
        assert dec.capacity == dec.limit == 256 and dec.min_capacity == 256
        stats = model.swapmoe.stats()["total"]
        assert stats["lookups"] == 0 and stats["swaps"] == 0  # the priming decode is not counted
        assert all(float(st.importance.abs().sum()) == 0.0 for st in model.swapmoe.layers)
        got = [running.openai().completions.create(model=MODEL_NAME, prompt="The quick brown fox", max_tokens=n,
                                                   temperature=0).choices[0].text for n in (4, 40)]
        assert dec.compiled.compiles == 1 and dec.capacity == 256
        assert model.swapmoe.stats()["total"]["lookups"] > 0
    assert got == want
