#!/usr/bin/env python3
"""Reads `perf script` output (samples with call chains) on stdin and prints CPU per stage.

Each sample is charged to the innermost frame that names a stage; samples without one go to
"other". Usage: perf script -i perf.data --pid PID --time START,END | perf-stages.py MB SAMPLE_HZ
(the bench prints its pid; START,END the seconds of the measured ingest, from
`perf script -F time`). Used for the README's "Where the CPU goes".
"""
import re, sys, collections

STAGES = [
    ("TLS (rustls, aws-lc)", re.compile(r"aws_lc|rustls|aes_gcm|gcm_")),
    ("POP3 decoding", re.compile(r"ccmail::pop3")),
    ("HTML sanitising", re.compile(r"ammonia|html5ever|markup5ever|tendril|sanitize_html|parse::html")),
    ("text derivation (HTML to text)", re.compile(r"mail_parser::decoders::html|html_to_text")),
    ("hashing (SHA-256, identity)", re.compile(r"sha2::|ingest::identity")),
    ("SQL encoding (sqlx)", re.compile(r"sqlx|serde_json|ccmail::store")),
    ("MIME parsing (mail-parser, census, repair)", re.compile(r"mail_parser|encoding_rs|ccmail::ingest::parse")),
    ("kernel (sockets, scheduling, page faults)", re.compile(r"kernel\.kallsyms|\[unknown\] \(\[k")),
]

def classify(frames):
    for f in frames:
        for name, rx in STAGES:
            if rx.search(f):
                return name
    return "other"

def main():
    mb = float(sys.argv[1]) if len(sys.argv) > 1 else 0
    hz = float(sys.argv[2]) if len(sys.argv) > 2 else 0
    counts = collections.Counter()
    frames = []
    in_sample = False
    for line in sys.stdin:
        if not line.strip():
            if frames:
                counts[classify(frames)] += 1
            frames = []
            in_sample = False
            continue
        if not line.startswith((" ", "\t")):
            in_sample = True
            frames = []
            continue
        frames.append(line.strip())
    if frames:
        counts[classify(frames)] += 1
    total = sum(counts.values())
    for name, n in counts.most_common():
        ms = n / hz * 1000 if hz else 0
        per_mb = ms / mb if mb else 0
        print(f"{name:<30} {n:>7} samples {100*n/total:5.1f} %  {ms:8.0f} ms  {per_mb:6.1f} ms/MB")
    print(f"{'total':<30} {total:>7} samples")

main()
