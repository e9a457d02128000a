"""Records -> Conversations: reading the field's data formats (chat, instruction, tool calls, reasoning) into one shape, validating them with file:line errors, and writing them back."""
