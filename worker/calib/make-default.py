#!/usr/bin/env python3
"""Builds default.txt, the calibration set `awq quantize` ships with.

usage: make-default.py TEXT_DIR > default.txt   (TEXT_DIR: the output of ../shared/assets/fetch-text)

Paragraphs (blank-line separated, line breaks joined with spaces) of 200 to 2500 characters from four
Jane Austen novels (public domain; text from Debian's r-cran-janeaustenr): Emma, Persuasion,
Northanger Abbey, Sense and Sensibility. Pride and Prejudice is left out because it is the text
perplexity is measured on. Every third qualifying paragraph is kept, one per output line, in book
order; the sampler shuffles them with a seed.
"""
import sys

books = ["emma", "persuasion", "northanger-abbey", "sense-and-sensibility"]
kept = 0
for book in books:
    text = open(f"{sys.argv[1]}/austen/{book}.txt", encoding="utf-8").read()
    paragraphs = [" ".join(p.split()) for p in text.split("\n\n")]
    for i, p in enumerate(q for q in paragraphs if 200 <= len(q) <= 2500):
        if i % 3 == 0:
            print(p)
            kept += 1
print(f"make-default: {kept} paragraphs", file=sys.stderr)
