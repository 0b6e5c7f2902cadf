"""Reading, checking, summarising and splitting count data."""
