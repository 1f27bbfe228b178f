"""Views of a run's timeline: the live terminal view and the HTML report."""
