"""Documents to datasets: corpora, activation extraction, teachers, parquet splits."""
