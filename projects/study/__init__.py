"""The transfer study: plan and run the grid of fine-tunes (`runner`), report them (`report`)."""
