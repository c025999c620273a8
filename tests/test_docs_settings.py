"""docs/settings.md has a row for every setting (a new setting is documented, with its bounds)."""

from __future__ import annotations

from conftest import ROOT

from profile_app.settings import ENV_PREFIX, Settings


def test_every_setting_has_a_row_in_docs_settings() -> None:
    text = (ROOT / "docs" / "settings.md").read_text()
    missing = [name for name in Settings.model_fields if f"| `{ENV_PREFIX}{name.upper()}`" not in text]
    assert not missing, f"add a row to docs/settings.md for {missing}"
