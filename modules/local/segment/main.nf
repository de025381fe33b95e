/*
 * SEGMENT: one batch of tiles through SAM2 (MKs), Cellpose-SAM + SAM2 (HSPCs) and ResNet-50
 * (embeddings) on one GPU. One task per batch, so a resumed run redoes only failed batches.
 * The slides its batch reads are staged (as links, in indexed folders: two may share a file
 * name) and bound to their slide ids (--slide-ids, comma-separated in the slides' order), so
 * slide ids that differ from file names (samplesheet ids) still match. Their PLAN records (slide.json: the modality and plane PLAN
 * read, the intensity range) come along, so every tile is read and scaled as PLAN saw it.
 * Without a models folder (an empty list: --models alone) it uses the weights baked into the image.
 */
process SEGMENT {
    tag "${batch_id}"
    label 'process_gpu'
    container 'ghcr.io/bmseg/bmseg:0.1.0-cuda'

    input:
    tuple val(batch_id), path(batch), val(slide_ids), path(slides, arity: '1..*', stageAs: 'slides??/*'), path(plans, arity: '1..*', stageAs: 'plans/*')
    path models, stageAs: 'models'

    output:
    tuple val(batch_id), path("${batch_id}"), emit: cells
    path 'versions.yml', emit: versions

    script:
    def args = task.ext.args ?: ''
    """
    bmseg --no-progress segment ${batch} --slides ${slides} --slide-ids ${slide_ids} --plans ${plans} --models ${models} ${args} --out ${batch_id}

    bmseg versions --process ${task.process} > versions.yml
    """

    stub:
    """
    mkdir -p ${batch_id}
    touch ${batch_id}/cells.parquet ${batch_id}/masks.h5 ${batch_id}/crops.parquet ${batch_id}/batch.json

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        bmseg: stub
    END_VERSIONS
    """
}
