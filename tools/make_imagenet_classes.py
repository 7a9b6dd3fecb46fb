"""Make `harmonization/imagenet_classes.txt`: the 1000 ImageNet-1k class names, one per line, in class-index order.

The names are WordNet lemmas. Two files of timm (huggingface/pytorch-image-models, `timm/data/_info/`, read at
commit aa4b5850c1543fa488abf260f18390eda46cf85d) give them:
`imagenet_synsets.txt` lists the 1000 synset ids in class-index order (n01440764 first, n15075141 last), and
`imagenet_synset_to_lemma.txt` maps each id to its comma-separated lemmas (`n01440764<TAB>tench, Tinca tinca`).
A class's name is its first lemma, the short common one ("tench", "goldfish", ..., "toilet tissue"). Names are
not unique ("crane" is a bird and a machine): users index by position, as the models do.

    python tools/make_imagenet_classes.py imagenet_synsets.txt imagenet_synset_to_lemma.txt
"""

from __future__ import annotations

import argparse
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "harmonization" / "imagenet_classes.txt"
NUM_CLASSES = 1000
# Spot checks of the class-index order.
EXPECTED = {0: "tench", 1: "goldfish", 999: "toilet tissue"}


def class_names(synsets_text: str, lemmas_text: str) -> list[str]:
    """The first lemma of each synset of `synsets_text`, in its order."""
    synsets = [line.strip() for line in synsets_text.splitlines() if line.strip()]
    lemmas = {}
    for line in lemmas_text.splitlines():
        if line.strip():
            synset, _, names = line.partition("\t")
            lemmas[synset.strip()] = names.split(",")[0].strip()
    missing = [s for s in synsets if not lemmas.get(s)]
    if len(synsets) != NUM_CLASSES or missing:
        raise ValueError(f"Expected {NUM_CLASSES} synsets, all with a lemma; got {len(synsets)}, "
                         f"{len(missing)} without a lemma (e.g. {missing[:3]}).")
    names = [lemmas[s] for s in synsets]
    wrong = {i: names[i] for i, name in EXPECTED.items() if names[i] != name}
    if wrong:
        raise ValueError(f"The synsets are not in ImageNet-1k class-index order: expected {EXPECTED}, got {wrong}.")
    return names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("synsets", type=Path, help="timm/data/_info/imagenet_synsets.txt")
    parser.add_argument("lemmas", type=Path, help="timm/data/_info/imagenet_synset_to_lemma.txt")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    names = class_names(args.synsets.read_text(encoding="utf-8"), args.lemmas.read_text(encoding="utf-8"))
    args.out.write_text("\n".join(names) + "\n", encoding="utf-8")
    print(f"Wrote {len(names)} class names to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
