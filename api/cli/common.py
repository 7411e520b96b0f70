"""What every verb shares."""

EXIT_USAGE = 2  # user errors: one line on stderr, this exit code
