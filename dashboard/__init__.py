"""difftune.dashboard: the Streamlit app over the store's API."""
