"""The bundled demo's jueju: a fixed subset of the shared poetry corpus.

Run from the repository root (Python 3, standard library only):

    python3 tests/data/scripts/jueju_subset.py ../shared/data/poetry/poems.jsonl \
        tests/data/poems/jueju.jsonl --chars 2000 --per-style 2400 --drop-title

Keeps the 五言绝句 and 七言绝句 records of the corpus (nanopoet's layout, see
tests/data/poems/README.md) whose every character of author, title and content is among the
--chars most frequent characters of the jueju's contents (the style names add their own few),
then takes --per-style of each style in the order of sha1(author|title|content). Records are
written one per line, in that order with the two styles alternating, so any prefix of the file is
balanced too. With --drop-title the title is neither checked nor written (the demo never prompts
with one, and it is a fifth of the bytes); the order still hashes it.

The character limit keeps the char vocabulary, and with it the output layer, small enough for a
two-minute run on a CPU; the sha1 order is a fixed shuffle independent of the corpus order.
"""
import argparse
import collections
import hashlib
import json

STYLES = ("五言绝句", "七言绝句")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("corpus")
    ap.add_argument("out")
    ap.add_argument("--chars", type=int, default=3000)
    ap.add_argument("--per-style", type=int, default=6000)
    ap.add_argument("--drop-title", action="store_true")
    args = ap.parse_args()
    checked = ("author", "content") if args.drop_title else ("author", "title", "content")

    records = []
    with open(args.corpus, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r["style"] in STYLES:
                out = line.rstrip("\n")
                if args.drop_title:
                    # Same key order and JSON spelling as the corpus, without the title.
                    kept = {k: v for k, v in r.items() if k != "title"}
                    out = json.dumps(kept, ensure_ascii=False, separators=(",", ":"))
                records.append((out, r))
    freq = collections.Counter()
    for _, r in records:
        freq.update(r["content"])
    # Ties are broken by code point, so the set does not depend on the corpus order.
    ranked = sorted(freq.items(), key=lambda kv: (-kv[1], kv[0]))
    common = {c for c, _ in ranked[: args.chars]}

    def key(r):
        text = f"{r['author']}|{r['title']}|{r['content']}"
        return hashlib.sha1(text.encode("utf-8")).hexdigest()

    by_style = {}
    for style in STYLES:
        kept = [
            (key(r), line)
            for line, r in records
            if r["style"] == style
            and all(set(r[k]) <= common for k in checked)
        ]
        kept.sort()
        if len(kept) < args.per_style:
            raise SystemExit(f"{style}: only {len(kept)} poems fit --chars {args.chars}")
        by_style[style] = [line for _, line in kept[: args.per_style]]
    with open(args.out, "w", encoding="utf-8") as f:
        for pair in zip(*(by_style[s] for s in STYLES)):
            for line in pair:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
