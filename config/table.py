"""Print every setting as a markdown table (name, env var, default, meaning) for the README."""

from __future__ import annotations

from config.settings import Settings


def settings_table() -> str:
    lines = ["| setting | env var | default | meaning |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.default_factory() if field.default_factory else field.default
        lines.append(
            f"| `{name}` | `EPCWATCH_{name.upper()}` | `{default}` | {field.description or ''} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(settings_table())
