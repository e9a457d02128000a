// Renders an Ollama Modelfile TEMPLATE the way Ollama's chat endpoint does: Go's
// text/template over .Messages (Role, Content), with the Modelfile's SYSTEM prepended as a
// system message when the conversation has none. Reads JSON {"template", "system",
// "messages": [{"role", "content"}]} on stdin, writes the rendered prompt on stdout.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Request struct {
	Template string    `json:"template"`
	System   string    `json:"system"`
	Messages []Message `json:"messages"`
}

func main() {
	var request Request
	if err := json.NewDecoder(os.Stdin).Decode(&request); err != nil {
		fmt.Fprintln(os.Stderr, "bad request:", err)
		os.Exit(2)
	}
	messages := request.Messages
	if request.System != "" && (len(messages) == 0 || messages[0].Role != "system") {
		messages = append([]Message{{Role: "system", Content: request.System}}, messages...)
	}
	parsed, err := template.New("modelfile").Parse(request.Template)
	if err != nil {
		fmt.Fprintln(os.Stderr, "template does not parse:", err)
		os.Exit(3)
	}
	values := map[string]any{"Messages": messages, "System": request.System}
	if err := parsed.Execute(os.Stdout, values); err != nil {
		fmt.Fprintln(os.Stderr, "template does not render:", err)
		os.Exit(4)
	}
}
