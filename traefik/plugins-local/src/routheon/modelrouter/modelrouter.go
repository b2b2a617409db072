// Package modelrouter is Routheon's Traefik middleware for "one key, many models".
//
// It checks the request's single `Authorization: Bearer KEY` against a table of key hashes,
// reads the JSON body's "model", picks the one service of the key that declares that model
// and names it in the X-Routheon-Service header. The router using this middleware proxies to
// Traefik's own loopback entry point "routheon-hop", whose routers match that header. Every
// refusal is an OpenAI error object. Design and cost: docs/model-routing.md.
//
// Traefik interprets this file with Yaegi; the calls into the standard library (sha256,
// encoding/json, bytes) run compiled, so per-request cost is dominated by them, not by Yaegi.
package modelrouter

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"unicode/utf8"
)

// HopHeader names the chosen service; the hop entry point's routers match it. Any copy the
// client sent is deleted first, so no client header can steer routing.
const HopHeader = "X-Routheon-Service"

const bearer = "Bearer "

// Config is the middleware's configuration, written by Routheon into routheon-grants.yml.
// Both tables are text, one entry per line: Traefik hands a string over as it is, where a
// YAML mapping of 10,000 keys would be decoded node by node.
type Config struct {
	// Services holds "NAME MODEL..." lines: the model names each service answers.
	Services string `json:"services,omitempty"`
	// Keys holds "SHA256-HEX HINT SERVICE..." lines; the hint is for listings only.
	Keys string `json:"keys,omitempty"`
	// Usage is the folder usage records go to (docs/usage.md); empty: no accounting.
	Usage string `json:"usage,omitempty"`
}

// CreateConfig returns an empty configuration for Traefik to decode into.
func CreateConfig() *Config {
	return &Config{}
}

type service struct {
	name   string
	models map[string]bool
}

// ModelRouter is the middleware: an immutable table built once per configuration.
type ModelRouter struct {
	next  http.Handler
	keys  map[string][]*service
	hints map[string]string
	usage *usageLog
}

// New parses the tables; an unknown service or a malformed line is an error (Traefik then
// disables the router and logs why) rather than a key that silently routes elsewhere.
func New(_ context.Context, next http.Handler, config *Config, name string) (http.Handler, error) {
	services := map[string]*service{}
	for number, line := range strings.Split(config.Services, "\n") {
		fields := strings.Fields(line)
		if len(fields) == 0 {
			continue
		}
		if services[fields[0]] != nil {
			return nil, fmt.Errorf("%s: services line %d: service %q is declared twice", name, number+1, fields[0])
		}
		entry := &service{name: fields[0], models: map[string]bool{}}
		for _, model := range fields[1:] {
			entry.models[model] = true
		}
		services[fields[0]] = entry
	}
	keys, hints := map[string][]*service{}, map[string]string{}
	for number, line := range strings.Split(config.Keys, "\n") {
		fields := strings.Fields(line)
		if len(fields) == 0 {
			continue
		}
		if len(fields) < 3 || len(fields[0]) != sha256.Size*2 {
			return nil, fmt.Errorf("%s: keys line %d: expected SHA256-HEX HINT SERVICE...", name, number+1)
		}
		granted := make([]*service, 0, len(fields)-2)
		for _, serviceName := range fields[2:] {
			entry := services[serviceName]
			if entry == nil {
				return nil, fmt.Errorf("%s: keys line %d: service %q is not declared", name, number+1, serviceName)
			}
			granted = append(granted, entry)
		}
		keys[fields[0]] = granted
		hints[fields[0]] = fields[1]
	}
	usage, err := openUsage(config.Usage)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	return &ModelRouter{next: next, keys: keys, hints: hints, usage: usage}, nil
}

func (m *ModelRouter) ServeHTTP(rw http.ResponseWriter, req *http.Request) {
	req.Header.Del(HopHeader)
	// Exactly one Authorization header: with two, Traefik's Header matcher accepts either one,
	// and which one a backend reads is up to the backend.
	values := req.Header.Values("Authorization")
	if len(values) != 1 || !strings.HasPrefix(values[0], bearer) {
		writeError(rw, http.StatusUnauthorized, "Invalid API key.", "invalid_api_key")
		return
	}
	sum := sha256.Sum256([]byte(values[0][len(bearer):]))
	digest := hex.EncodeToString(sum[:])
	granted := m.keys[digest]
	if len(granted) == 0 {
		writeError(rw, http.StatusUnauthorized, "Invalid API key.", "invalid_api_key")
		return
	}
	if m.usage != nil {
		meter := m.meter(rw, req, digest)
		defer meter.end()
		rw = meter
	}
	// The body is read whole even when no model is needed: Go's net/http (Traefik's proxy)
	// otherwise cuts about one stream in fifty under CPU load (traefik/traefik.yml). Only the
	// request is buffered; the answer streams through.
	body, err := readBody(req)
	if err != nil {
		writeError(rw, http.StatusBadRequest, "The request body could not be read.", "invalid_body")
		return
	}
	// One service without declared models: today's behaviour, whatever the body says.
	if len(granted) == 1 && len(granted[0].models) == 0 {
		m.forward(rw, req, granted[0])
		return
	}
	model, present, problem := bodyModel(body)
	if problem != "" {
		writeError(rw, http.StatusBadRequest, problem, "invalid_request_body")
		return
	}
	if !present {
		if len(granted) == 1 {
			m.forward(rw, req, granted[0]) // GET /health, /props, /metrics, ... of its one service
			return
		}
		writeError(rw, http.StatusBadRequest,
			"This API key may use several models: name one in the request body's \"model\" field.", "model_required")
		return
	}
	for _, entry := range granted {
		if entry.models[model] {
			m.forward(rw, req, entry)
			return
		}
	}
	shown := model
	if len(shown) > 200 {
		shown = shown[:200] + "..."
	}
	writeError(rw, http.StatusNotFound,
		fmt.Sprintf("The model %q does not exist or this API key may not use it.", shown), "model_not_found")
}

func (m *ModelRouter) forward(rw http.ResponseWriter, req *http.Request, entry *service) {
	req.Header.Set(HopHeader, entry.name)
	if meter, ok := rw.(*usageMeter); ok {
		meter.serve(m.next, req, entry.name)
		return
	}
	m.next.ServeHTTP(rw, req)
}

// readBody replaces the request body by an in-memory copy and returns it (nil when none).
// There is no size limit, as with the retry middleware of today's key routers
// (maxRequestBodyBytes: -1): only holders of a granted key get this far.
func readBody(req *http.Request) ([]byte, error) {
	if req.Body == nil || req.Body == http.NoBody {
		return nil, nil
	}
	var buffer bytes.Buffer
	if req.ContentLength > 0 {
		buffer.Grow(int(req.ContentLength))
	}
	_, err := io.Copy(&buffer, req.Body)
	req.Body.Close()
	if err != nil {
		return nil, err
	}
	body := buffer.Bytes()
	req.Body = io.NopCloser(bytes.NewReader(body))
	req.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(body)), nil }
	req.ContentLength = int64(len(body))
	req.TransferEncoding = nil
	if len(body) == 0 {
		req.Body = http.NoBody
	}
	return body, nil
}

// bodyModel returns the top-level "model" of a JSON object body, whether it is there, and
// what is wrong with the body if it cannot be routed. It reads the body as llama-server does
// (nlohmann::json): escapes decoded ("\u0061lpha" is "alpha"), the last of duplicate fields
// wins (checked against llama-server 11434's /tokenize), invalid UTF-8 refused. Decoding into
// a map, not a struct, keeps field names case-sensitive ("MODEL" is not "model").
func bodyModel(body []byte) (string, bool, string) {
	if len(bytes.TrimSpace(body)) == 0 {
		return "", false, ""
	}
	if !utf8.Valid(body) {
		return "", false, "The request body is not valid UTF-8."
	}
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(body, &fields); err != nil {
		return "", false, "The request body is not a JSON object."
	}
	raw, present := fields["model"]
	if !present {
		return "", false, ""
	}
	// null decodes into a string without an error: insist on a JSON string
	var model string
	if len(raw) == 0 || raw[0] != '"' || json.Unmarshal(raw, &model) != nil {
		return "", false, "The request body's \"model\" must be a string."
	}
	return model, true, ""
}

// writeError answers an OpenAI error object, like routheon-server's /errors pages.
func writeError(rw http.ResponseWriter, status int, message, code string) {
	body, _ := json.Marshal(map[string]map[string]string{
		"error": {"message": message, "type": "invalid_request_error", "code": code},
	})
	rw.Header().Set("Content-Type", "application/json")
	rw.Header().Set("Content-Length", strconv.Itoa(len(body)))
	rw.WriteHeader(status)
	rw.Write(body)
}
