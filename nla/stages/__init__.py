"""One module per CLI stage (datagen, train-ar, train-av, rl, verbalize, eval, demo) plus the report."""
