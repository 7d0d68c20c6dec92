"""Reports: statistics with seeds and confidence intervals, plots, markdown and HTML pages."""
