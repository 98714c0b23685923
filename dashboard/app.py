"""The Streamlit script ``difftune dashboard`` serves (``streamlit run`` takes a file): :mod:`difftune.dashboard`."""

from difftune.dashboard._app import main

main()
