"""Step 5: measure populations and quality, and report.

    metrics.py    the math: bias metrics, intervals and tests (pure functions)
    tables.py     per-prompt, summary and comparison tables from classified and scored image folders
    report.py     report.md with its charts and grids
    precision.py  rounds of identity-specific images until their accuracy is measured as precisely as asked
                  (`python -m popalign.evaluate.precision`, used by eval.sh)
    __main__.py   `python -m popalign.evaluate`: the tables and the report of given image folders
"""
