"""``python -m flmm_lightning.assets``: build every tiny asset and print where it lives."""

from flmm_lightning.assets.catalog import ASSETS, ensure_asset


def main() -> None:
    """``python -m flmm_lightning.assets``: build every tiny asset and print where it lives."""
    for name in ASSETS:
        print(f"{name}: {ensure_asset(name)}")


if __name__ == "__main__":
    main()
