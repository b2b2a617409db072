// Usage accounting: one JSON line per request of a known key, written by Traefik itself.
//
// The middleware wraps the ResponseWriter of every request it forwards or refuses for a known
// key, reads the tokens from the answer's tail as it passes (nothing is buffered: each Write
// goes on at once and is flushed), and hands one record per request to the folder's writer.
// Design and record format: docs/usage.md.
//
// Written for Yaegi, where every interpreted statement allocates (a few reflect.Values each):
// a Write only copies and searches (bytes.LastIndex, compiled) and the tokens are decoded
// once, when the answer ends (encoding/json, compiled). Measured with Yaegi 0.16.1 (Traefik
// 3.7.15's) on a plain answer: about 700 allocations more per request than without
// accounting, three quarters of them the wrapper's calls, the record and the body's fields;
// the cost in Traefik is in docs/usage.md, "Cost".
package modelrouter

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"time"
)

const (
	// What a Write keeps of the previous one: a key split across two writes is found.
	carrySize = 64
	// What is kept of an answer from its last token key on, to be read when the answer ends:
	// llama-server's usage object is about 150 bytes, its counts are next to each other.
	captureLimit = 4096
	// While the usage event is taken out of a stream, an unfinished event is held until its end;
	// one longer than this is no event Routheon knows, and the stream is passed on unparsed.
	eventLimit = 64 << 10
	// How often the writer writes what waits (see run).
	flushPause = 50 * time.Millisecond
	// Records waiting for a stuck disk beyond this many bytes are dropped (and said so).
	pendingLimit = 16 << 20
	// A failing folder is reported on stderr (Traefik's log) at most this often.
	complaintEvery = time.Minute
	// Traefik's status for a request whose client went away before the answer started.
	statusClientClosed = 499
)

var (
	usageKey    = []byte(`"usage":`)
	modelField  = []byte(`"model"`)
	streamField = []byte(`"stream"`)
	// llama.cpp's own counts (its /completion): "tokens_predicted":N,"tokens_evaluated":N
	countsKey    = []byte(`"tokens_`)
	evaluatedKey = []byte(`"tokens_evaluated":`)
	predictedKey = []byte(`"tokens_predicted":`)
	// the end of an OpenAI-style stream (in the last bytes of the answer): a client may hang up
	// once it has it, before the proxy has read the end of the answer
	doneEvent = []byte("data: [DONE]")
	// llama-server's usage event of a stream: `data: {"choices":[],...,"usage":{...}}`; json.dumps
	// (Python backends) writes a space after the colon
	emptyChoices = [][]byte{[]byte(`"choices":[]`), []byte(`"choices": []`)}
	eventEnds    = [][]byte{[]byte("\n\n"), []byte("\r\n\r\n")}
	// OpenAI-style streams llama-server sends usage in only when asked (llama.cpp #16052).
	streamPaths = map[string]bool{
		"/v1/chat/completions": true, "/v1/completions": true, "/chat/completions": true, "/completions": true,
	}
	processID = strconv.Itoa(os.Getpid())
)

// usageLogs holds one writer per folder for the whole process: Traefik builds the middleware
// anew on every configuration reload, and a writer per instance would leak a goroutine each time.
var (
	usageLogsMu   sync.Mutex
	usageLogs     = map[string]*usageLog{}
	watchShutdown sync.Once
)

// usageLog queues whole lines of one UTC day and appends them to <folder>/<day>.<pid>.jsonl.
type usageLog struct {
	folder  string
	mu      sync.Mutex
	day     string
	pending []byte
	dropped int
	// set once Traefik is told to stop: each record is then written before its request ends
	direct   bool
	writeMu  sync.Mutex
	lastSaid time.Time
}

// openUsage returns the writer for folder ("" turns accounting off).
func openUsage(folder string) (*usageLog, error) {
	if folder == "" {
		return nil, nil
	}
	if !filepath.IsAbs(folder) {
		return nil, fmt.Errorf("usage: %q is not an absolute path", folder)
	}
	folder = filepath.Clean(folder)
	watchShutdown.Do(flushOnShutdown)
	usageLogsMu.Lock()
	defer usageLogsMu.Unlock()
	log := usageLogs[folder]
	if log == nil {
		log = &usageLog{folder: folder}
		usageLogs[folder] = log
		go log.run()
	}
	return log, nil
}

// flushOnShutdown writes what waits when Traefik gets SIGTERM or SIGINT, and every later record
// at once: Traefik then finishes the requests in flight and exits without a word to plugins.
func flushOnShutdown() {
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, os.Interrupt, sigterm())
	go func() {
		<-signals
		usageLogsMu.Lock()
		logs := make([]*usageLog, 0, len(usageLogs))
		for _, log := range usageLogs {
			logs = append(logs, log)
		}
		usageLogsMu.Unlock()
		for _, log := range logs {
			log.mu.Lock()
			log.direct = true
			log.mu.Unlock()
			log.flush()
		}
	}()
}

// sigterm is syscall.SIGTERM, made from os.Kill's type: Traefik gives plugins no syscall
// package (only with useUnsafe), and os names no other signal than Interrupt and Kill.
func sigterm() os.Signal {
	signal := reflect.New(reflect.TypeOf(os.Kill)).Elem()
	signal.SetInt(15)
	return signal.Interface().(os.Signal)
}

// add queues a record: on the request's path, so as little as can be.
func (l *usageLog) add(day string, line []byte) {
	l.mu.Lock()
	if l.direct || (day != l.day && len(l.pending) > 0) || len(l.pending)+len(line) > pendingLimit {
		l.mu.Unlock()
		l.addNow(day, line)
		return
	}
	l.day = day
	l.pending = append(l.pending, line...)
	l.mu.Unlock()
}

// addNow is add when Traefik stops (the record is written at once), at midnight UTC (the last
// day's records are written first) and when records pile up (it is dropped).
func (l *usageLog) addNow(day string, line []byte) {
	l.mu.Lock()
	direct, full := l.direct, len(l.pending)+len(line) > pendingLimit
	if full {
		l.dropped++
	}
	l.mu.Unlock()
	if direct {
		l.write(day, line)
	} else if !full {
		l.flush()
		l.add(day, line)
	}
}

// run writes what waits every flushPause: records reach their file that long after their
// request ended, and a busy Traefik writes one batch per pause.
func (l *usageLog) run() {
	for {
		time.Sleep(flushPause)
		l.safely(l.flush)
	}
}

// safely runs step, stopping a panic there: one in a goroutine would end Traefik.
func (l *usageLog) safely(step func()) {
	defer func() {
		if failure := recover(); failure != nil {
			l.complain(fmt.Errorf("%v", failure), 0)
		}
	}()
	step()
}

func (l *usageLog) flush() {
	l.mu.Lock()
	day, lines, dropped := l.day, l.pending, l.dropped
	l.pending = nil // one statement each: Yaegi 0.16 panics on `a, b = nil, 0`
	l.dropped = 0
	l.mu.Unlock()
	if dropped > 0 {
		l.complain(fmt.Errorf("more than %d bytes of records waited to be written", pendingLimit), dropped)
	}
	if len(lines) > 0 {
		l.write(day, lines)
	}
}

// write appends whole lines with one call on a file opened for it (O_APPEND): a file removed
// or moved away meanwhile is simply started again, and two writers never mix their lines.
func (l *usageLog) write(day string, lines []byte) {
	l.writeMu.Lock()
	defer l.writeMu.Unlock()
	path := filepath.Join(l.folder, day+"."+processID+".jsonl")
	file, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o640)
	if os.IsNotExist(err) {
		if err = os.MkdirAll(l.folder, 0o750); err == nil {
			file, err = os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o640)
		}
	}
	if err == nil {
		_, err = file.Write(lines)
		if closeErr := file.Close(); err == nil {
			err = closeErr
		}
	}
	if err != nil {
		l.complain(err, bytes.Count(lines, []byte("\n")))
	}
}

// complain says on stderr (Traefik's log) that records were lost, at most once a minute.
// Requests never notice: they were answered before their records were written.
func (l *usageLog) complain(err error, lost int) {
	if time.Since(l.lastSaid) < complaintEvery {
		return
	}
	l.lastSaid = time.Now()
	fmt.Fprintf(os.Stderr, "routheon: usage records lost (%d, more unreported for a minute): %v\n", lost, err)
}

// record is one line of a usage file; the fields are in the documented order.
type record struct {
	Time             string  `json:"time"`
	DurationMs       float64 `json:"duration_ms"`
	Key              string  `json:"key"`
	Hint             string  `json:"hint"`
	Name             string  `json:"name"`
	Model            string  `json:"model"`
	Service          string  `json:"service"`
	Method           string  `json:"method"`
	Path             string  `json:"path"`
	Code             int     `json:"code"`
	Stream           bool    `json:"stream"`
	PromptTokens     *int64  `json:"prompt_tokens"`
	CompletionTokens *int64  `json:"completion_tokens"`
	Outcome          string  `json:"outcome"`
}

// requestFacts is what a record needs from the request body, and include_usage's injection.
type requestFacts struct {
	model   string
	stream  bool
	options json.RawMessage
	body    []byte
}

// requestFields are the body's fields that requestFacts come from. Decoding into a struct
// matches field names case-insensitively (llama-server does not): a field counts only when its
// name is in the body as such.
type requestFields struct {
	Model         json.RawMessage `json:"model"`
	Stream        json.RawMessage `json:"stream"`
	StreamOptions json.RawMessage `json:"stream_options"`
}

// readFacts reads the body again (readBody left it in memory).
func readFacts(req *http.Request) requestFacts {
	facts := requestFacts{}
	if req.GetBody == nil {
		return facts
	}
	reader, err := req.GetBody()
	if err == nil {
		facts.body, err = io.ReadAll(reader)
	}
	fields := requestFields{}
	if err != nil || json.Unmarshal(facts.body, &fields) != nil {
		return facts
	}
	if len(fields.Model) > 0 && fields.Model[0] == '"' && bytes.Contains(facts.body, modelField) {
		json.Unmarshal(fields.Model, &facts.model)
	}
	facts.stream = string(fields.Stream) == "true" && bytes.Contains(facts.body, streamField)
	facts.options = fields.StreamOptions
	return facts
}

// withUsageAsked is the body with stream_options.include_usage set (other options kept), or
// nil when the client asked for usage itself or stream_options is no object. The new field
// goes last: llama-server takes the last of duplicate fields.
func (facts requestFacts) withUsageAsked() []byte {
	options := map[string]json.RawMessage{}
	if len(facts.options) > 0 && json.Unmarshal(facts.options, &options) != nil {
		return nil
	}
	if string(options["include_usage"]) == "true" {
		return nil
	}
	options["include_usage"] = json.RawMessage("true")
	added, err := json.Marshal(options)
	body := bytes.TrimRight(facts.body, " \t\r\n")
	if err != nil || len(body) < 2 || body[len(body)-1] != '}' {
		return nil
	}
	result := make([]byte, 0, len(body)+len(added)+20)
	result = append(result, body[:len(body)-1]...)
	result = append(result, `,"stream_options":`...)
	result = append(result, added...)
	return append(result, '}')
}

type usageCounts struct {
	PromptTokens     *int64 `json:"prompt_tokens"`
	CompletionTokens *int64 `json:"completion_tokens"`
}

// tokens are the answer's last usage object (embeddings: prompt only, so no completion
// tokens), else llama.cpp's own counts; nil when unknown.
func (w *usageMeter) tokens() (*int64, *int64) {
	if !bytes.HasPrefix(w.found, usageKey) {
		prompt, completion := count(w.found, evaluatedKey), count(w.found, predictedKey)
		if prompt == nil || completion == nil {
			return nil, nil
		}
		return prompt, completion
	}
	counts := usageCounts{}
	err := json.NewDecoder(bytes.NewReader(w.found[len(usageKey):])).Decode(&counts)
	if err != nil || counts.PromptTokens == nil || *counts.PromptTokens < 0 {
		return nil, nil
	}
	if counts.CompletionTokens == nil {
		counts.CompletionTokens = new(int64)
	}
	if *counts.CompletionTokens < 0 {
		return nil, nil
	}
	return counts.PromptTokens, counts.CompletionTokens
}

// count is the number after key in text, when something follows it (its last digits might
// otherwise be missing).
func count(text, key []byte) *int64 {
	at := bytes.Index(text, key)
	if at < 0 {
		return nil
	}
	var number int64
	decoder := json.NewDecoder(bytes.NewReader(text[at+len(key):]))
	if decoder.Decode(&number) != nil || number < 0 || int(decoder.InputOffset()) >= len(text)-at-len(key) {
		return nil
	}
	return &number
}

// usageMeter is the ResponseWriter of one request of a known key.
type usageMeter struct {
	rw          http.ResponseWriter
	flusher     http.Flusher
	req         *http.Request
	log         *usageLog
	key         string
	hint        string
	start       time.Time
	facts       requestFacts
	service     string
	code        int
	wroteHeader bool
	completed   bool
	writeFailed bool
	// include_usage was added for this request: the usage event is not the client's to see
	hideUsage bool
	stripping bool
	event     []byte
	window    []byte
	carry     []byte
	found     []byte
}

func (m *ModelRouter) meter(rw http.ResponseWriter, req *http.Request, digest string) *usageMeter {
	flusher, _ := rw.(http.Flusher)
	return &usageMeter{
		rw: rw, flusher: flusher, req: req, log: m.usage, key: digest, hint: m.hints[digest],
		start: time.Now(),
	}
}

// serve forwards the request to the chosen service.
func (w *usageMeter) serve(next http.Handler, req *http.Request, service string) {
	w.service = service
	w.facts = readFacts(req)
	if w.facts.stream && streamPaths[req.URL.Path] {
		w.askUsage(req)
	}
	next.ServeHTTP(w, req)
	w.completed = true
}

// askUsage asks for usage in a stream that did not ask for it: its usage event is then kept
// from the client (Write).
func (w *usageMeter) askUsage(req *http.Request) {
	body := w.facts.withUsageAsked()
	if body == nil {
		return
	}
	req.Body = io.NopCloser(bytes.NewReader(body))
	req.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(body)), nil }
	req.ContentLength = int64(len(body))
	w.hideUsage = true
}

func (w *usageMeter) Header() http.Header {
	return w.rw.Header()
}

func (w *usageMeter) WriteHeader(code int) {
	if code < 200 || w.wroteHeader {
		w.rw.WriteHeader(code)
		return
	}
	w.wroteHeader = true
	w.code = code
	if w.hideUsage && code < 300 && strings.HasPrefix(w.rw.Header().Get("Content-Type"), "text/event-stream") {
		w.stripping = true
		w.rw.Header().Del("Content-Length") // the usage event's bytes will be missing
	}
	w.rw.WriteHeader(code)
}

// Write passes p on at once and flushes it: Traefik's proxy cannot see this wrapper's Flush
// through Yaegi (traefik#10269), so a stream would otherwise arrive only at its end.
//
// On the way it keeps the answer from its last token key on (about captureLimit bytes), and
// the last bytes of each write for a key split between two; the tokens are read once, when
// the answer ends (tokens). It is one function on purpose: a call costs Yaegi an allocation
// per variable of the function called, and this runs for every chunk of every stream.
func (w *usageMeter) Write(p []byte) (int, error) {
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	window := append(append(w.window[:0], w.carry...), p...)
	found := w.found
	at := bytes.LastIndex(window, usageKey)
	if at < 0 {
		at = bytes.Index(window, countsKey)
	}
	if at >= 0 {
		found = append(found[:0], window[at:]...)
	} else if len(found) > 0 && len(found) < captureLimit {
		found = append(found, p...) // bounded: it grows no more once past captureLimit
	}
	cut := len(window) - carrySize
	if cut < 0 {
		cut = 0
	}
	w.window = window
	w.found = found
	w.carry = append(w.carry[:0], window[cut:]...)
	out := p
	// most writes of a stream are whole events, none of them to take out
	if w.stripping && (len(w.event) > 0 || !bytes.HasSuffix(p, eventEnds[0]) ||
		bytes.Contains(p, emptyChoices[0]) || bytes.Contains(p, emptyChoices[1])) {
		out = w.withoutUsageEvent(p)
	}
	if len(out) > 0 {
		if _, err := w.rw.Write(out); err != nil {
			w.writeFailed = true
			return 0, err
		}
		if w.flusher != nil {
			w.flusher.Flush()
		}
	}
	return len(p), nil
}

// withoutUsageEvent passes on the complete events of the stream so far, less the usage event;
// an unfinished event waits for its end (the client could not use half of one anyway).
func (w *usageMeter) withoutUsageEvent(p []byte) []byte {
	data := p
	if len(w.event) > 0 {
		data = append(w.event, p...)
	}
	end := -1
	for _, boundary := range eventEnds {
		if at := bytes.LastIndex(data, boundary); at >= 0 && at+len(boundary) > end {
			end = at + len(boundary)
		}
	}
	if end < 0 {
		if len(data) > eventLimit {
			w.stripping = false
			w.event = nil
			return data
		}
		w.event = append(w.event[:0], data...)
		return nil
	}
	w.event = append([]byte(nil), data[end:]...)
	return dropUsageEvent(data[:end])
}

// dropUsageEvent removes the events without choices from whole events: the usage event, which
// exists only because Routheon asked for it, and which clients that read choices[0] of every
// chunk cannot take.
func dropUsageEvent(events []byte) []byte {
	for {
		at := -1
		for _, pattern := range emptyChoices {
			if found := bytes.Index(events, pattern); found >= 0 && (at < 0 || found < at) {
				at = found
			}
		}
		if at < 0 {
			return events
		}
		start, stop := 0, len(events)
		for _, boundary := range eventEnds {
			if found := bytes.LastIndex(events[:at], boundary); found >= 0 && found+len(boundary) > start {
				start = found + len(boundary)
			}
			if found := bytes.Index(events[at:], boundary); found >= 0 && at+found+len(boundary) < stop {
				stop = at + found + len(boundary)
			}
		}
		events = append(events[:start:start], events[stop:]...)
	}
}

// end writes the request's record; it runs deferred, also when the proxy aborts the answer
// (it panics with http.ErrAbortHandler when the client or the backend goes away mid-answer).
func (w *usageMeter) end() {
	if w.completed && len(w.event) > 0 {
		if _, err := w.rw.Write(w.event); err != nil {
			w.writeFailed = true
		}
	}
	if w.service == "" {
		w.facts = readFacts(w.req) // refused: serve did not read them
	}
	finished := time.Now().UTC()
	code := w.code
	prompt, completion := w.tokens()
	// answered: a client that hangs up after the tokens or the stream's end got its answer
	answered := w.completed || prompt != nil || bytes.Contains(w.carry, doneEvent)
	outcome := "no_usage"
	switch {
	case w.service == "":
		outcome = "refused"
	case code == statusClientClosed || (!answered && (w.writeFailed || w.req.Context().Err() != nil)):
		outcome = "client_gone"
		if code == statusClientClosed {
			code = 0 // Traefik's status for the client that was no longer there to get it
		}
	case code >= 400 || !answered:
		outcome = "error"
	case prompt != nil:
		outcome = "ok"
	}
	line, err := json.Marshal(record{
		Time:             finished.Format("2006-01-02T15:04:05.000Z"),
		DurationMs:       float64(finished.Sub(w.start).Microseconds()/100) / 10,
		Key:              w.key,
		Hint:             w.hint,
		Model:            w.facts.model,
		Service:          w.service,
		Method:           w.req.Method,
		Path:             w.req.URL.Path,
		Code:             code,
		Stream:           w.facts.stream,
		PromptTokens:     prompt,
		CompletionTokens: completion,
		Outcome:          outcome,
	})
	if err != nil {
		return
	}
	w.log.add(finished.Format("2006-01-02"), append(line, '\n'))
}
