"""difftune.search: searchers behind one ask/tell interface and the study runner (the calibrate issue)."""
